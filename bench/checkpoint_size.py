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
from components.diffusion.sdxl_base import build_component
from components.diffusion.tiny import build_tiny
from components.host_memory import release_memory
from components.storage import arrow_filesystem, filesystem_path, is_s3, s3_client
from components.training import checkpointing as ck

MIN_8BIT = 4096
BLOCK = 256
SMALL_FILES = ("COMPLETE", "state.json", "lr_scheduler.json")


def build_unet(size: str, seed: int = 0) -> torch.nn.Module:
    if size == "full":
        return build_component("unet", seed)
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


class Reader:
    """The files of a checkpoint at a local path or an s3:// prefix, opened for streaming."""

    def __init__(self, target: str, endpoint_url: str | None):
        self.target, self.fs = target, arrow_filesystem(target, endpoint_url)

    def open(self, name: str):
        if self.fs is None:
            return open(Path(self.target) / name, "rb")  # noqa: SIM115 -- closed by the caller's with
        return self.fs.open_input_file(f"{filesystem_path(self.target)}/{name}")

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
            scratch: Path) -> list[dict]:
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
        unet = build_unet(group_size)
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
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--s3-size", choices=("full", "tiny"),
                   help="the size for s3:// targets (default --size). moto's server assembles a multipart upload "
                        "in memory, so on a 24 GB machine a 10 GB object kills it: the smoke sends the tiny size")
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
                           endpoint_url, scratch)
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
