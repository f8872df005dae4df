"""
The CORE eval bundle (task files, random baselines, GPT-2's results), found in this order: --bundle-dir, env
NANOCHAT_EVAL_BUNDLE, <base_dir>/eval_bundle, else downloaded once (with a lock, so ranks share one download) and
unpacked there. The metric that reads it is nanochat/core_eval.py.
"""

import os
import shutil
import tempfile
import zipfile

from nanochat.common import DownloadError, download_file_with_lock, get_base_dir, print0
from nanochat.errors import NanochatError

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


class BundleError(NanochatError):
    """The eval bundle is missing, unreadable or malformed. The message says which file and what to do."""


class BundleUnavailable(BundleError):
    """No bundle on disk and none to download (offline): the one CORE failure a training run skips quietly."""


def _bundle_ready(path):
    return os.path.isfile(os.path.join(path, "core.yaml"))


def _extract_bundle(zip_path, target):
    """Unpack the zip as target, atomically (extract to a temp dir, then rename)."""
    tmp_dir = tempfile.mkdtemp(prefix="eval_bundle_tmp_", dir=os.path.dirname(zip_path))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp_dir)
        source = os.path.join(tmp_dir, "eval_bundle")
        if not _bundle_ready(source):
            raise BundleError(f"{zip_path} has no eval_bundle/core.yaml inside; delete it and run again to re-download")
        try:
            os.replace(source, target)
        except OSError:
            if not _bundle_ready(target):  # another rank's finished copy is fine; anything else is a real error
                raise
    except zipfile.BadZipFile:
        raise BundleError(f"{zip_path} is not a valid zip; delete it and run again to re-download") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print0(f"Placed eval bundle at {target}")


def resolve_bundle_dir(bundle_dir=None):
    """Return a directory holding core.yaml. Raises BundleError with a what-to-do message."""
    source = "--bundle-dir" if bundle_dir else "NANOCHAT_EVAL_BUNDLE"
    bundle_dir = bundle_dir or os.environ.get("NANOCHAT_EVAL_BUNDLE")
    if bundle_dir:
        if not _bundle_ready(bundle_dir):
            raise BundleError(f"{source}={bundle_dir}: no core.yaml there; point it at the unzipped eval_bundle folder")
        return os.path.abspath(bundle_dir)
    target = os.path.join(get_base_dir(), "eval_bundle")
    if _bundle_ready(target):
        return target
    try:
        zip_path = download_file_with_lock(EVAL_BUNDLE_URL, "eval_bundle.zip")
    except DownloadError as e:
        raise BundleUnavailable(
            f"CORE eval bundle not found at {target} and the download failed ({e}). Copy an unzipped eval_bundle "
            f"there, or pass --bundle-dir DIR / set NANOCHAT_EVAL_BUNDLE, or run without CORE (--eval=bpb,sample)"
        ) from None
    if not _bundle_ready(target):  # fresh download, or a zip whose folder was deleted
        _extract_bundle(zip_path, target)
    return target
