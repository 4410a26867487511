"""The toy world (DESIGN.md §7): the scene and caption generator (:mod:`.world`), the tiny Chinese-CLIP trained
on it and shipped as ``toy-tiny`` (:mod:`.model`) and the toy detector shipped as ``toy-detector``
(:mod:`.detector`). A test bed and an offline demo, never a stand-in for real weights."""
