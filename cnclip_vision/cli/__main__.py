import sys

from cnclip_vision.cli import main

sys.exit(main())
