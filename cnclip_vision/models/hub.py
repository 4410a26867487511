"""Released weights on the Hugging Face Hub, through huggingface_hub and its cache.

``HF_HUB_OFFLINE=1`` and ``HF_HOME`` / ``HF_HUB_CACHE`` are honoured by huggingface_hub itself; when the
files are neither cached nor downloadable the error says how to get them.

Without ``HF_HUB_OFFLINE``, one request to the Hub (:data:`PROBE_TIMEOUT` seconds at most) comes first:
when it gets no answer, only the local cache is used. huggingface_hub itself retries a failed connection
five times with backoff (about 25 s) before failing or falling back to its cache, on every file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cnclip_vision.errors import WeightsNotFoundError
from cnclip_vision.models.configs import ModelInfo

logger = logging.getLogger(__name__)

__all__ = ["download_weights"]

PROBE_TIMEOUT = 5.0  # seconds for the one request that tells whether the Hub can be reached

# tried in order for repos in the Hugging Face layout
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_SIDE_FILES = ("config.json", "preprocessor_config.json", "vocab.txt")


def _hub_unreachable() -> str | None:
    """None when the Hub answers one HEAD request (any HTTP status) within :data:`PROBE_TIMEOUT`, else why not."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=min(PROBE_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT))
    except Exception as e:  # httpx's connect / timeout / proxy errors, whatever the client raises
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def download_weights(info: ModelInfo, revision: str | None = None) -> Path:
    """Local path of a registered model's weights: a Hugging Face directory, or the original ``.pt``
    file for repos that hold only that (RN50)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    if info.local_path is not None:
        return Path(info.local_path)
    if info.hub_id is None:
        raise WeightsNotFoundError(f"model {info.name!r} has no released weights")
    hub_id: str = info.hub_id
    unreachable = None if constants.HF_HUB_OFFLINE else _hub_unreachable()
    if unreachable is not None:
        logger.info("the Hugging Face Hub (%s) cannot be reached (%s): cache only", constants.ENDPOINT, unreachable)
    local_only = constants.HF_HUB_OFFLINE or unreachable is not None

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(hub_id, filename, revision=revision, local_files_only=local_only))

    try:
        if info.name == "RN50":  # transformers has no RN50 class; the repo holds the original checkpoint
            return fetch(info.original_file or "")
        config = fetch("config.json")
        for name in _HF_WEIGHT_FILES:
            try:
                fetch(name)
                break
            except EntryNotFoundError:  # includes "not in the cache" while offline: try the next name
                if name == _HF_WEIGHT_FILES[-1]:
                    raise
        for name in _HF_SIDE_FILES[1:]:
            try:
                fetch(name)
            except EntryNotFoundError:
                logger.info("%s has no %s; using the packaged default", info.hub_id, name)
        return config.parent
    except (LocalEntryNotFoundError, EntryNotFoundError, OSError) as e:
        if local_only:  # huggingface_hub's words add nothing then (and suggest local_files_only=False)
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT}: {unreachable}"
            cause = f"not downloaded ({why})"
        else:
            cause = f"could not be downloaded. Cause: {str(e).splitlines()[0]}"
        raise WeightsNotFoundError(
            f"the weights of {info.name} ({info.hub_id}) are not in the Hugging Face cache at "
            f"{constants.HF_HUB_CACHE} and {cause}. On a machine with access run "
            f"`huggingface-cli download {info.hub_id}` and copy the cache (or set HF_HOME to it), or pass a "
            f"local directory or clip_cn_*.pt file to cnclip_vision.load"
        ) from e
