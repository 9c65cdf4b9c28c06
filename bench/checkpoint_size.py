"""A full fine-tune's checkpoint at SDXL's real size, written and read back locally and on S3, without training.

    python -m bench.checkpoint_size --size full --optimizer adamw8bit --target DIR --target s3://bucket/prefix \\
        --s3-endpoint-url moto --json OUT

The UNet (seeded random weights, fp32: what a full fine-tune keeps) and an optimizer state shaped as
``train.optimizer`` keeps it (``components.training.memory.plan.optimizer_state_bytes`` gives the same bytes:
for ``adamw8bit`` bitsandbytes' uint8 moments with an fp32 absmax per 256-element block, fp32 moments for
tensors under 4096 elements) go through the training code's ``save_checkpoint`` into the first local target.
An ``s3://`` target gets that directory as Ray Train uploads a checkpoint (pyarrow's ``copy_files`` to the
same filesystem ``components.storage.arrow_filesystem`` gives Ray), at ``--s3-size`` (moto's server assembles
a multipart upload in memory: a 10 GB object does not fit beside a 24 GB machine's other processes).
Reading back checks the ``COMPLETE`` marker's file sizes (``verify_complete`` for a local copy, the same rule on the
object sizes for S3) and then every tensor of the UNet and the optimizer state against a sha256 taken from the source
before it was freed, streaming the files (a local file or the S3 object, never downloaded whole).

Then a killed write, at the tiny size, per target: the previous checkpoint written whole, the next one's
writer (``save_checkpoint``; for S3 the upload, marker first) killed with SIGKILL before it finished. The
previous must still verify and the cut one must be refused.

``--s3-endpoint-url moto`` starts moto's standalone S3 server on 127.0.0.1 for the run and stops it by its
process id. The last stdout line is the JSON (``--json`` writes it too):
``{"targets": [{"target", "size", "bytes", "write_s", "read_s", "verified", "killed_write_refused",
"previous_after_kill_verified"}], ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs
import torch

from components.config import OptimizerName, TinyModelConfig
from components.diffusion.safetensors_stream import read_tensors
from components.diffusion.sdxl_base import build_component, component_seed, empty_component, seeded_init
from components.diffusion.tiny import build_tiny
from components.host_memory import release_memory
from components.storage import arrow_filesystem, filesystem_path, is_s3, s3_client
from components.training import checkpointing as ck
from components.training.memory.plan import optimizer_state_bytes

MIN_8BIT = 4096
BLOCK = 256
SMALL_FILES = ("COMPLETE", "state.json", "lr_scheduler.json")


def checkpoint_bytes(module: torch.nn.Module, optimizer: OptimizerName) -> int:
    """A full fine-tune's checkpoint of ``module``: its fp32 weights and ``optimizer``'s state (the memory plan's
    formula)."""
    shapes = [p.shape for p in module.parameters()]
    return 4 * sum(math.prod(s) for s in shapes) + optimizer_state_bytes(shapes, optimizer)


def largest_block(optimizer: OptimizerName, max_bytes: int, seed: int = 0) -> torch.nn.Module:
    """The full-size UNet's largest block (a top-level child, or one of its ``down_blocks``/``up_blocks``) whose
    checkpoint fits ``max_bytes``, seeded exactly as in the whole UNet and under the same key names
    (``mid_block.attentions.0...``): the largest real part of a full checkpoint a server that cannot hold the
    whole one takes."""
    unet = empty_component("unet")  # the meta device: shapes only
    blocks = []
    for name, child in unet.named_children():
        parts = enumerate(child) if isinstance(child, torch.nn.ModuleList) else [(None, child)]
        blocks += [(name if i is None else f"{name}.{i}", part) for i, part in parts]
    fitting = [(checkpoint_bytes(m, optimizer), name, m) for name, m in blocks
               if 0 < checkpoint_bytes(m, optimizer) <= max_bytes]
    if not fitting:
        raise SystemExit(f"--s3-max-gb {max_bytes / 1e9:g}: no block of the UNet fits")
    _, name, block = max(fitting, key=lambda f: f[0])
    holder = torch.nn.Module()
    parent = holder
    *path, last = name.split(".")
    for part in path:  # the block under its own name, so seeds and keys are the whole UNet's
        parent.add_module(part, torch.nn.Module())
        parent = getattr(parent, part)
    parent.add_module(last, block)
    return seeded_init(holder, component_seed(seed, "unet")).eval()


def build_unet(size: str, seed: int = 0, optimizer: OptimizerName = OptimizerName.ADAMW_8BIT,
               max_bytes: int = 0) -> torch.nn.Module:
    """``full``: SDXL's UNet at real size; ``block``: its largest block whose checkpoint fits ``max_bytes``;
    ``tiny``: the tiny model's UNet."""
    if size == "full":
        return build_component("unet", seed)
    if size == "block":
        return largest_block(optimizer, max_bytes, seed)
    torch.manual_seed(seed)
    return build_tiny(TinyModelConfig()).unet


def optimizer_state(unet: torch.nn.Module, optimizer: OptimizerName, seed: int = 0) -> dict:
    """A state dict shaped as ``optimizer`` keeps it for every parameter, filled with seeded values."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, p in enumerate(unet.parameters()):
        n = p.numel()
        if optimizer is OptimizerName.ADAMW_8BIT and n >= MIN_8BIT:
            blocks = math.ceil(n / BLOCK)
            entry = {"state1": torch.randint(0, 256, p.shape, dtype=torch.uint8, generator=gen),
                     "state2": torch.randint(0, 256, p.shape, dtype=torch.uint8, generator=gen),
                     "absmax1": torch.rand(blocks, generator=gen), "absmax2": torch.rand(blocks, generator=gen)}
        elif optimizer in (OptimizerName.ADAMW, OptimizerName.ADAMW_8BIT):
            entry = {"exp_avg": torch.randn(p.shape, generator=gen), "exp_avg_sq": torch.rand(p.shape, generator=gen)}
        else:
            raise SystemExit(f"--optimizer {optimizer.value}: adamw or adamw8bit")
        state[i] = {"step": torch.tensor(1.0), **entry}
    return {"state": state, "param_groups": [{"lr": 8e-7, "params": list(state)}]}


def _digest(tensor: torch.Tensor) -> str:
    t = tensor.detach().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{t.dtype}|{tuple(tensor.shape)}|".encode())
    if t.numel():
        digest.update(memoryview(t.view(torch.uint8).numpy()))
    return digest.hexdigest()


def digests(unet_state: dict, opt_state: dict) -> dict[str, str]:
    out = {f"unet/{k}": _digest(v) for k, v in unet_state.items()}
    out.update({f"opt/{i}/{k}": _digest(v) for i, entry in opt_state["state"].items() for k, v in entry.items()})
    return out


def _scheduler():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=8e-7)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def write_local(directory: Path, unet, opt_state: dict) -> Path:
    opt, sched = _scheduler()
    if directory.exists():
        shutil.rmtree(directory)
    return ck.save_checkpoint(directory, unet, opt, sched, ck.TrainState(step=1), optimizer_state=opt_state)


def upload(directory: Path, target: str, endpoint_url: str | None, die_after: int | None = None) -> None:
    """The directory to ``target`` file by file, the marker first (the order Ray's upload does not promise)."""
    fs = arrow_filesystem(target, endpoint_url)
    base = filesystem_path(target)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(base)
    names = sorted(p.name for p in directory.iterdir())
    names.sort(key=lambda n: n != ck.COMPLETE)
    for count, name in enumerate(names):
        if die_after is not None and count == die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        pyarrow.fs.copy_files(str(directory / name), f"{base}/{name}", destination_filesystem=fs)


class BlockReader(io.RawIOBase):
    """A seekable view of an S3 object read in ``block``-sized ranged GETs, one block held at a time.

    moto's server answers every ranged GET by reading the whole object first, so reading a 1.6 GB file tensor
    by tensor (hundreds of small ranges) costs hundreds of whole-object reads; in large blocks it costs a few.
    A real S3 endpoint serves ranges directly; the reads are the same bytes either way."""

    def __init__(self, fh, block: int = 256 * 2**20):
        super().__init__()
        self.fh, self.block, self.pos, self.start, self.data = fh, block, 0, -1, b""
        self.size = fh.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self.pos < self.size:
            if not self.start <= self.pos < self.start + len(self.data):
                self.start = self.pos // self.block * self.block
                self.fh.seek(self.start)
                self.data = self.fh.read(self.block)
            chunk = self.data[self.pos - self.start:self.pos - self.start + len(view) - done]
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
            self.pos += len(chunk)
        return done

    def close(self) -> None:
        self.fh.close()
        super().close()


class Reader:
    """The files of a checkpoint at a local path or an s3:// prefix, opened for streaming."""

    def __init__(self, target: str, endpoint_url: str | None):
        self.target, self.fs = target, arrow_filesystem(target, endpoint_url)

    def open(self, name: str):
        if self.fs is None:
            return open(Path(self.target) / name, "rb")  # noqa: SIM115 -- closed by the caller's with
        return io.BufferedReader(BlockReader(self.fs.open_input_file(f"{filesystem_path(self.target)}/{name}")))

    def verify_complete(self) -> None:
        if self.fs is None:
            ck.verify_complete(Path(self.target))
            return
        base = filesystem_path(self.target)
        try:
            with self.open(ck.COMPLETE) as fh:
                sizes = dict(json.loads(fh.read())["files"])
        except (FileNotFoundError, OSError, ValueError, KeyError) as err:
            raise ck.IncompleteCheckpointError(f"{self.target}: no readable {ck.COMPLETE} ({err})") from None
        infos = self.fs.get_file_info([f"{base}/{name}" for name in sizes])
        for (name, size), info in zip(sizes.items(), infos, strict=True):
            if info.type != pyarrow.fs.FileType.File or info.size != size:
                found = info.size if info.type == pyarrow.fs.FileType.File else "missing"
                raise ck.IncompleteCheckpointError(f"{self.target}: {name} is {found}, {ck.COMPLETE} says {size}")

    def bytes(self) -> int:
        with self.open(ck.COMPLETE) as fh:
            return sum(json.loads(fh.read())["files"].values())


def read_back(target: str, endpoint_url: str | None, expected: dict[str, str]) -> bool:
    """Marker, sizes and every tensor's sha256 against ``expected``; one tensor in memory at a time for the
    UNet, the optimizer state (one ``torch.load``, weights only) after it."""
    reader = Reader(target, endpoint_url)
    reader.verify_complete()
    found = {}
    with reader.open(ck.UNET_FILE) as fh:
        for key, tensor in read_tensors(fh, name=f"{target}/{ck.UNET_FILE}"):
            found[f"unet/{key}"] = _digest(tensor)
    with reader.open("optimizer.pt") as fh:
        opt = torch.load(fh, weights_only=True)
    found.update({f"opt/{i}/{k}": _digest(v) for i, entry in opt["state"].items() for k, v in entry.items()})
    del opt
    return found == expected


def measure(size: str, s3_size: str, optimizer: OptimizerName, targets: list[str], endpoint_url: str | None,
            scratch: Path, max_bytes: int = 0) -> list[dict]:
    """Each local target at ``size``, each S3 target at ``s3_size`` (uploaded from a local copy at that size)."""
    local = next((t for t in targets if not is_s3(t)), None)
    if local is None:
        raise SystemExit("give one local --target: the checkpoint is written there first, then uploaded")
    rows = []
    for group_size in dict.fromkeys([size, s3_size]):
        group = [t for t in targets if (s3_size if is_s3(t) else size) == group_size]
        if not group:
            continue
        staged = Path(local) if group_size == size else scratch / f"staged-{group_size}"
        unet = build_unet(group_size, optimizer=optimizer, max_bytes=max_bytes)
        opt_state = optimizer_state(unet, optimizer)
        expected = digests(unet.state_dict(), opt_state)
        t0 = time.perf_counter()
        write_local(staged, unet, opt_state)
        local_write = time.perf_counter() - t0
        del unet, opt_state
        release_memory()
        for target in group:
            write_s = local_write
            if is_s3(target):
                t0 = time.perf_counter()
                upload(staged, target, endpoint_url)
                write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            verified = read_back(target, endpoint_url, expected)
            rows.append({"target": target, "size": group_size, "bytes": Reader(target, endpoint_url).bytes(),
                         "write_s": round(write_s, 1), "read_s": round(time.perf_counter() - t0, 1),
                         "verified": verified})
            release_memory()
    return rows


def killed_write(target: str, endpoint_url: str | None, scratch: Path) -> dict:
    """The previous checkpoint whole at ``target``/previous, the next one's writer killed; what survives."""
    unet = build_unet("tiny")
    opt_state = optimizer_state(unet, OptimizerName.ADAMW_8BIT)
    expected = digests(unet.state_dict(), opt_state)
    previous, cut = f"{target.rstrip('/')}/previous", f"{target.rstrip('/')}/cut"
    staged = write_local(scratch / "previous" if is_s3(target) else Path(previous), unet, opt_state)
    if is_s3(target):
        upload(staged, previous, endpoint_url)
    child = [sys.executable, "-m", "bench.checkpoint_size", "--kill-write", cut, "--scratch", str(scratch / "cut")]
    if endpoint_url:
        child += ["--s3-endpoint-url", endpoint_url]
    proc = subprocess.run(child, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the killed writer exited {proc.returncode}: {proc.stderr[-500:]}")
    try:
        Reader(cut, endpoint_url).verify_complete()
        refused = False
    except ck.IncompleteCheckpointError:
        refused = True
    return {"killed_write_refused": refused,
            "previous_after_kill_verified": read_back(previous, endpoint_url, expected)}


def kill_write(target: str, endpoint_url: str | None, scratch: Path) -> None:
    """The child of ``killed_write``: writes a checkpoint to ``target`` and is killed before it completes (the
    local writer just before its marker; the S3 upload after the marker and one more file)."""
    unet = build_unet("tiny", seed=1)
    opt_state = optimizer_state(unet, OptimizerName.ADAMW_8BIT, seed=1)
    if is_s3(target):
        staged = write_local(scratch, unet, opt_state)
        upload(staged, target, endpoint_url, die_after=2)
    else:
        ck.write_complete = lambda directory: os.kill(os.getpid(), signal.SIGKILL)
        write_local(Path(target), unet, opt_state)
    raise AssertionError("the writer was meant to be killed")


@contextlib.contextmanager
def s3_endpoint(value: str | None, buckets: list[str]):
    """``moto``: moto's standalone server on loopback for the run (stopped by its pid); a URL: used as is."""
    proc = None
    if value == "moto":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, default in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                             ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(key, default)
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        value = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("moto's S3 server did not start")
            time.sleep(0.2)
    try:
        if value:
            client = s3_client(value)
            for bucket in buckets:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=bucket)
        yield value
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("full", "block", "tiny"), default="full")
    p.add_argument("--s3-size", choices=("full", "block", "tiny"),
                   help="the size for s3:// targets (default --size). moto's server assembles a multipart upload "
                        "in memory, so on a 24 GB machine a 10 GB object kills it: the smoke sends the largest "
                        "block of the UNet whose checkpoint fits --s3-max-gb")
    p.add_argument("--s3-max-gb", type=float, default=3.0,
                   help="--size/--s3-size block: the most checkpoint bytes the block may take (default 3)")
    p.add_argument("--optimizer", default="adamw8bit", choices=("adamw", "adamw8bit"))
    p.add_argument("--target", action="append", default=[], help="a local folder or s3://bucket/prefix (repeat)")
    p.add_argument("--s3-endpoint-url", help="'moto' to start moto's server on loopback, or an endpoint URL")
    p.add_argument("--json", help="where to write the result")
    p.add_argument("--kill-write", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.kill_write:
        kill_write(args.kill_write, args.s3_endpoint_url, Path(args.scratch))
        return None
    if not args.target:
        p.error("give at least one --target")
    buckets = sorted({t[5:].split("/")[0] for t in args.target if is_s3(t)})
    with s3_endpoint(args.s3_endpoint_url, buckets) as endpoint_url:
        local = Path(next((t for t in args.target if not is_s3(t)), "."))
        scratch = local.parent / f".{local.name}.kill"
        try:
            rows = measure(args.size, args.s3_size or args.size, OptimizerName(args.optimizer), args.target,
                           endpoint_url, scratch, int(args.s3_max_gb * 1e9))
            for row in rows:
                row.update(killed_write(row["target"].rstrip("/") + "-kill", endpoint_url, scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(f"{local}-kill", ignore_errors=True)
    result = {"size": args.size, "s3_size": args.s3_size or args.size, "optimizer": args.optimizer, "targets": rows}
    line = json.dumps(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(line)
    return result


if __name__ == "__main__":
    main()
