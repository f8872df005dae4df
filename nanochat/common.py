"""
Runtime helpers shared by every stage: where artifacts live, which device and dtype we compute in,
distributed set-up under torchrun, printing, peak-FLOPs lookup and the one download helper.
Device, dtype, compile and process-group decisions are made here and nowhere else. Importing this module changes
nothing in the process: the garbage-collector and allocator policies of a training run are nanochat.training's, and
the training scripts call them.
"""

import os
import math
import argparse
import contextlib
import gzip
import json
import re
import time
import fcntl
import shutil
import socket
import secrets
import logging
import resource
import urllib.error
import urllib.request

import torch
import torch.distributed as dist

from nanochat.errors import NanochatError

# -----------------------------------------------------------------------------
# Logging: a level-coloured formatter, numbers highlighted in INFO lines

class ColoredFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[35m"}
    RESET, BOLD = "\033[0m", "\033[1m"

    def format(self, record):
        levelname = record.levelname
        if levelname in self.COLORS:
            record.levelname = f"{self.COLORS[levelname]}{self.BOLD}{levelname}{self.RESET}"
        message = super().format(record)
        if levelname == "INFO":
            message = re.sub(r"(\d+\.?\d*\s*(?:GB|MB|%|docs))", rf"{self.BOLD}\1{self.RESET}", message)
            message = re.sub(r"(Shard \d+)", rf"{self.COLORS['INFO']}{self.BOLD}\1{self.RESET}", message)
        record.levelname = levelname
        return message

_handler = logging.StreamHandler()
_handler.setFormatter(ColoredFormatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
logging.basicConfig(level=logging.INFO, handlers=[_handler])
logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# Where artifacts live

def get_base_dir():
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    if os.path.exists(base_dir) and not os.path.isdir(base_dir):
        raise NanochatError(f"the base dir {base_dir} (NANOCHAT_BASE_DIR) is a file, not a directory")
    try:
        os.makedirs(base_dir, exist_ok=True)
    except OSError as e:  # under a file, on a read-only filesystem, no permission
        raise NanochatError(f"cannot create the base dir {base_dir} (NANOCHAT_BASE_DIR): {e.strerror}") from None
    return base_dir

# -----------------------------------------------------------------------------
# Printing and distributed info

def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)

def print_banner():
    banner = r"""
                                                       █████                █████
                                                      ░░███                ░░███
 ████████    ██████   ████████    ██████   ██████  ░███████    ██████   ███████
░░███░░███  ░░░░░███ ░░███░░███  ███░░███ ███░░███ ░███░░███  ░░░░░███ ░░░███░
 ░███ ░███   ███████  ░███ ░███ ░███ ░███░███ ░░░  ░███ ░███   ███████   ░███
 ░███ ░███  ███░░███  ░███ ░███ ░███ ░███░███  ███ ░███ ░███  ███░░███   ░███ ███
 ████ █████░░████████ ████ █████░░██████ ░░██████  ████ █████░░████████  ░░█████
░░░░ ░░░░░  ░░░░░░░░ ░░░░ ░░░░░  ░░░░░░   ░░░░░░  ░░░░ ░░░░░  ░░░░░░░░    ░░░░░
"""
    print0(banner)

def is_ddp_initialized():
    return dist.is_available() and dist.is_initialized()

def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment, else a single process."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1

# -----------------------------------------------------------------------------
# Device and compute dtype

def autodetect_device_type():
    device_type = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    print0(f"Autodetected device type: {device_type}")
    return device_type

def _choose_compute_dtype():
    # One decision for the whole program: weights stay fp32 masters, activations flow in this dtype.
    forced = os.environ.get("NANOCHAT_DTYPE", "").strip()
    choices = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if forced:
        if forced not in choices:
            raise NanochatError(f"NANOCHAT_DTYPE={forced!r} is not one of {', '.join(choices)}")
        return choices[forced], f"forced by NANOCHAT_DTYPE={forced}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return torch.bfloat16, f"CUDA compute capability {major}.{minor} supports bf16"
        return torch.float32, f"CUDA compute capability {major}.{minor} < 8.0 has no fast bf16 (set NANOCHAT_DTYPE=float16 to force fp16)"
    return torch.float32, "no CUDA device: computing in fp32"

COMPUTE_DTYPE, COMPUTE_DTYPE_REASON = _choose_compute_dtype()

def compute_init(device_type="cuda", seed=42):
    """Seed torch's generators (every rank alike: ranks build identical initial weights), set precision flags and,
    under torchrun, join the process group (NCCL on CUDA, gloo on CPU)."""
    if device_type not in ("cuda", "mps", "cpu"):
        raise NanochatError(f"--device-type={device_type} is not one of cuda, cpu, mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise NanochatError("--device-type=cuda but no CUDA device is available (try --device-type=cpu)")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise NanochatError("--device-type=mps but MPS is not available (try --device-type=cpu)")

    torch.manual_seed(seed)  # (the CPU generator and every device's)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain

    ddp, rank, local_rank, world_size = get_dist_info()
    device = torch.device("cuda", local_rank) if ddp and device_type == "cuda" else torch.device(device_type)
    if ddp and device_type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    elif ddp:  # gloo lets multi-process runs work on CPU too (tests, laptops, CPU clusters)
        dist.init_process_group(backend="gloo")
    if ddp:
        dist.barrier()
        check_shared_base_dir(rank, world_size, device)
    if rank == 0 and ddp:
        logger.info(f"Distributed world size: {world_size}")
    return ddp, rank, local_rank, world_size, device

def check_shared_base_dir(rank, world_size, device):
    """Every rank must see the files that rank 0 writes in the base dir: rank 0 writes a checkpoint's model, meta and
    completion marker, every rank its own optimizer shard, and a resume reads them all back. Across nodes that takes
    one filesystem they all share; a node that does not see rank 0's marker file stops every rank with one line."""
    base_dir = get_base_dir()
    name = [f".shared-check-{secrets.token_hex(8)}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    marker = os.path.join(base_dir, name[0])
    if rank == 0:
        atomic_write(marker, lambda f: None)
    dist.barrier()
    blind = torch.zeros(world_size, dtype=torch.int32, device=device)
    blind[rank] = int(not os.path.exists(marker))
    dist.all_reduce(blind)  # returns once every rank has looked
    if rank == 0:
        os.remove(marker)
    if blind.any():
        ranks = ", ".join(str(r) for r in blind.nonzero().flatten().tolist())
        dist.destroy_process_group()  # every rank leaves together, none aborts on a peer that is gone
        raise NanochatError(f"rank(s) {ranks} cannot see the files rank 0 writes in the base dir "
                            f"({base_dir} here): a multi-node run needs NANOCHAT_BASE_DIR on a filesystem shared by "
                            "every node")

def compute_cleanup():
    if is_ddp_initialized():
        dist.destroy_process_group()

def synchronize(device_type):
    """Wait for queued device work, so wall-clock timings measure the work itself (a no-op on CPU)."""
    if device_type == "cuda":
        torch.cuda.synchronize()

def peak_memory_mib(device_type):
    """Peak memory of this process in MiB: allocated tensors on CUDA, resident set size elsewhere."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

def int_in(interval, *allow):
    """argparse type= of an integer flag in `interval`, written like "[1, inf)" or "[0, 65535]", or one of the
    sentinels in `allow` that the flag's help documents (e.g. -1 = off): int_in("[1, inf)", -1)."""
    return _number_in(int, interval, allow)

def float_in(interval, *allow):
    """argparse type= of a float flag: finite (never NaN or inf) and in `interval`, e.g. float_in("[0, 1)")."""
    return _number_in(float, interval, allow)

def _number_in(kind, interval, allow):
    # Anything else (NaN, inf, out of range, not a number) is argparse's one `error: argument --flag: must be ...`
    # line and exit code 2, before the script does any work.
    left, low, high, right = re.fullmatch(r"([\[(])(.+), (.+)([\])])", interval).groups()
    low, high = (float(b) if "inf" in b else kind(b) for b in (low, high))
    wanted = f"{'an integer' if kind is int else 'a finite number'} in {interval}{''.join(f' or {a}' for a in allow)}"

    def parse(text):
        with contextlib.suppress(ValueError):  # not a number: the error below
            value = kind(text)
            finite = kind is int or math.isfinite(value)  # (a huge int would overflow isfinite)
            above = low <= value if left == "[" else low < value
            below = value <= high if right == "]" else value < high
            if value in allow or (finite and above and below):
                return value
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return parse

# -----------------------------------------------------------------------------
# Atomic writes: a reader (or a resumed run) sees the old file or the new one, never half of one

def atomic_write(path, write_fn, mode="wb"):
    """Write via write_fn(file) to a temp file beside path, fsync it, rename it over path, fsync the directory."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory; the rename itself is still atomic
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

def iter_jsonl(path, error=ValueError, hint=""):
    """(line number, row) for each non-blank line of a JSONL file (.gz ok). A line that is not JSON raises
    error("<path>:<line>: not valid JSON (...)<hint>"): a bad row is reported, never silently dropped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
            yield lineno, row

def positive_ints(text):
    """argparse type for "1,4,16": a non-empty list of integers >= 1 (anything else is argparse's one-line error)."""
    try:
        values = [int_in("[1, inf)")(v) for v in text.split(",") if v.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers in [1, inf), got {text}")
    return values

class NoOp:
    """Every method call does nothing: stands in for a wandb run when logging is off (--run=dummy), and for the
    report on non-zero ranks."""
    def __getattr__(self, name):
        return lambda *args, **kwargs: None

# -----------------------------------------------------------------------------
# Peak FLOP/s for MFU: the vendors' dense (no sparsity) bf16 tensor figures, matched by the words of the device name:
# the first entry whose words all occur wins, so specific names come first. torch names SXM parts without a form
# factor ("NVIDIA H100 80GB HBM3") and PCIe / NVL parts with it ("NVIDIA H100 PCIe"). Data-centre and workstation
# parts: the datasheet's BF16 Tensor Core figure (halved where the datasheet quotes it with sparsity). GeForce parts:
# the dense "FP16 Tensor with FP32 accumulate" figure of NVIDIA's architecture whitepapers, the rate bf16 training runs
# at on those cards. NANOCHAT_PEAK_FLOPS supplies the figure for any other device, or overrides this table.

_PEAK_FLOPS = [
    # Blackwell: GB200 per GPU (NVL72: 180 PF / 72 GPUs), B200 (HGX B200), B100, RTX PRO 6000 Blackwell
    (["gb200"], 2.5e15), (["b200"], 2.25e15), (["b100"], 1.75e15), (["rtx", "pro", "6000"], 503.8e12),
    # Hopper: SXM 989.4 TF (GH200 carries the same GPU), PCIe 756 TF, NVL 835 TF
    (["gh200"], 989.4e12), (["h200", "nvl"], 835e12), (["h200"], 989.4e12),
    (["h100", "nvl"], 835e12), (["h100", "pcie"], 756e12), (["h100"], 989.4e12),
    (["h800", "pcie"], 756e12), (["h800"], 989.4e12),
    # Ampere and Ada data centre / workstation (SXM and PCIe A100 share the figure; the A10G has none published)
    (["a100"], 312e12), (["a800"], 312e12), (["a10"], 125e12), (["a40"], 149.7e12),
    (["a30"], 165e12), (["l40s"], 362.05e12), (["l40"], 181.05e12), (["l4"], 121e12),
    (["6000", "ada"], 364.2e12), (["a6000"], 154.8e12),
    # GeForce
    (["5090"], 209.5e12), (["5080"], 112.6e12), (["4090"], 165.2e12), (["4080"], 97.5e12),
    (["4070", "ti"], 80.2e12), (["4070"], 58.3e12), (["3090", "ti"], 80e12), (["3090"], 71e12), (["3080"], 59.5e12),
    # AMD Instinct
    (["mi355x"], 2.5e15), (["mi325x"], 1.3074e15), (["mi300x"], 1.3074e15), (["mi300a"], 980.6e12),
    (["mi250x"], 383e12), (["mi250"], 362.1e12),
]

def get_peak_flops(device_name):
    """bf16 dense peak FLOP/s of a device by name (NANOCHAT_PEAK_FLOPS first, then the table), or None when unknown
    (callers then print MFU as n/a, not 0%). Prints the figure and where it came from."""
    forced = os.environ.get("NANOCHAT_PEAK_FLOPS", "").strip()
    if forced:
        try:
            flops = float(forced)
        except ValueError:
            flops = -1.0
        if not 0 < flops < float("inf"):
            raise NanochatError(f"NANOCHAT_PEAK_FLOPS={forced!r} must be a positive number of FLOP/s, e.g. 989e12")
        print0(f"Peak FLOPS (BF16): {flops:.3e} for {device_name!r} (from NANOCHAT_PEAK_FLOPS)")
        return flops
    name = (device_name or "").lower()
    words = set(re.split(r"[^a-z0-9]+", name))
    flops = next((flops for keys, flops in _PEAK_FLOPS if all(k in words for k in keys)), None)
    source = "nanochat's table of datasheet figures, dense bf16"
    if flops is None and "data center gpu max 1550" in name and torch.xpu.is_available():
        flops = 512 * torch.xpu.get_device_properties().max_compute_units * 1300e6
        source = "Intel Max 1550: 512 FLOP/clock per compute unit at 1.3 GHz"
    if flops is None:
        print0(f"Peak FLOPS of {device_name!r} unknown: MFU is reported as n/a "
               "(set NANOCHAT_PEAK_FLOPS to the device's dense bf16 FLOP/s to supply it)")
    else:
        print0(f"Peak FLOPS (BF16): {flops:.3e} for {device_name!r} ({source})")
    return flops

# -----------------------------------------------------------------------------
# Downloads: retries with backoff, temp file + rename, clear failure when offline

class DownloadError(NanochatError, RuntimeError):
    """A download failed for good; the message says what to do instead."""

def is_offline():
    """True when the user asked every stage to stay off the network (NANOCHAT_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    truthy = ("1", "true", "yes", "on")
    return any(os.environ.get(k, "").lower() in truthy for k in ("NANOCHAT_OFFLINE", "HF_HUB_OFFLINE"))

def _is_unreachable(exc):
    # a refused connection or a failed name lookup will not fix itself in a few seconds: give up quickly
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror)) or "unreachable" in str(reason).lower()

def download_file(url, dest_path, retries=5, timeout=30, desc=None):
    """Download url to dest_path atomically. Returns dest_path. Raises DownloadError when it finally fails."""
    desc = desc or os.path.basename(dest_path)
    if is_offline():
        raise DownloadError(f"not downloading {desc} from {url}: NANOCHAT_OFFLINE/HF_HUB_OFFLINE is set; "
                            f"put the file at {dest_path} yourself or unset the variable")
    os.makedirs(os.path.dirname(os.path.abspath(dest_path)), exist_ok=True)

    def fetch(f):
        request = urllib.request.Request(url, headers={"User-Agent": "nanochat"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, f, 1 << 20)
            if expected is not None and f.tell() != int(expected):
                raise DownloadError(f"truncated body: got {f.tell()} of {expected} bytes")

    for attempt in range(1, retries + 1):
        try:
            atomic_write(dest_path, fetch)  # a failed attempt leaves no partial file
            return dest_path
        except (OSError, DownloadError) as e:  # URLError, HTTPError and timeouts are OSErrors
            last_error = e
            unreachable = _is_unreachable(e)
            client_error = isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code != 429
            if client_error or attempt == retries or (unreachable and attempt >= 2):
                break  # not found / forbidden, out of attempts, or no network: retrying will not help
            wait = 1 if unreachable else min(2 ** attempt, 30)
            print0(f"Download of {desc} failed (attempt {attempt}/{retries}: {e}); retrying in {wait}s")
            time.sleep(wait)
    hint = ("the network looks unreachable; download it on a connected machine and copy it to "
            f"{dest_path}, or use the offline options described in the README") if _is_unreachable(last_error) \
        else "check the URL and your connection, then run the command again (finished files are kept)"
    raise DownloadError(f"could not download {desc} from {url}: {last_error}; {hint}")

def download_file_with_lock(url, filename, postprocess_fn=None):
    """Download url to <base_dir>/filename once, even when several ranks ask at the same time."""
    file_path = os.path.join(get_base_dir(), filename)
    if os.path.exists(file_path):
        return file_path
    with open(file_path + ".lock", "w") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            if not os.path.exists(file_path):  # another rank may have finished while we waited
                print0(f"Downloading {url}")
                download_file(url, file_path)
                print0(f"Downloaded to {file_path}")
                if postprocess_fn is not None:
                    postprocess_fn(file_path)
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    return file_path

# On CPU, compiling even a small model (forward, backward and the optimizer's update functions) takes ~100 s of
# warm-up and then saves on the order of a second per step for the smallest documented models (d4, 1x512), so
# below this many steps eager finishes first. On CUDA compilation is always repaid.
CPU_COMPILE_MIN_STEPS = 200


def should_compile(device_type, mode, num_steps):
    """The one place that decides whether training runs compiled (`--compile auto|on|off`); logs the reason."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--compile must be auto, on or off, got {mode!r}")
    if mode != "auto":
        use, reason = mode == "on", f"--compile={mode}"
    elif device_type == "cuda":
        use, reason = True, "auto: always on CUDA"
    elif device_type == "cpu":
        use = num_steps >= CPU_COMPILE_MIN_STEPS
        reason = f"auto: {num_steps} steps {'>=' if use else '<'} {CPU_COMPILE_MIN_STEPS}, the CPU warm-up break-even"
    else:
        use, reason = False, f"auto: eager on {device_type}"
    print0(f"torch.compile: {'on' if use else 'off'} ({reason})")
    return use


# The training loss is computed in chunks of tokens (nanochat.gpt); two functions can compute a chunk:
LOSS_KERNELS = {
    "fused": "hand-written soft-capped cross-entropy, gradient computed in the forward pass, 3 lm_head matmuls",
    "cross_entropy": "F.cross_entropy of the soft-capped chunk, recomputed in the backward pass, 4 lm_head matmuls",
}
_loss_kernels = {}  # device type -> kernel


def choose_loss_kernel(device_type):
    """Which function computes a chunk of the training loss on this device type (printed once per type). "fused" was
    tuned for CPU, where it measured fastest; elsewhere the simplest, compiled with the model, until dev/gpu_check
    has measured the two there."""
    if device_type not in _loss_kernels:
        kernel = "fused" if device_type == "cpu" else "cross_entropy"
        reason = "measured fastest on CPU" if kernel == "fused" else f"the simplest on {device_type}"
        print0(f"Loss kernel: {kernel} ({reason}): {LOSS_KERNELS[kernel]}")
        _loss_kernels[device_type] = kernel
    return _loss_kernels[device_type]
