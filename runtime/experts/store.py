"""Reading experts' bytes from a GGUF file.

``ExpertStore`` reads one expert's gate/up/down planes (each a contiguous byte range of a 3-D
``*_exps`` tensor, the expert being the slowest axis) with ``os.preadv`` into page-aligned
buffers, with ``O_DIRECT`` where the filesystem allows it so the page cache neither doubles the
memory nor hides the cost; otherwise buffered reads followed by ``POSIX_FADV_DONTNEED``.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from pocketlm.nn.moe import down_transposed

ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned to the block size
PARTS = ("gate", "up", "down")



def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class _Plane:
    qtype: str
    shape: tuple[int, int]   # one expert's matrix, numpy order (rows, cols)
    offset: int              # absolute file offset of expert 0's plane
    nbytes: int              # bytes of one expert's plane

    def region(self) -> int:
        """Aligned buffer bytes that hold this plane wherever it starts in the file."""
        return _align_up(self.nbytes + ALIGN - 1)


class ExpertStore:
    """Reads experts' planes from a GGUF file; one instance per open model file."""

    def __init__(self, path: str, layers: dict[int, tuple[_Plane, _Plane, _Plane]],
                 n_expert: dict[int, int], down_t: dict[int, bool], direct: bool = True):
        self.path = path
        self.layers = layers
        self.n_expert = n_expert
        self.down_t = down_t
        self.direct = False
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:
                pass
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY)
        self.region = [max(p[i].region() for p in layers.values()) for i in range(3)]
        self.slot_bytes = sum(self.region)

    @classmethod
    def from_gguf(cls, g, direct: bool = True) -> "ExpertStore | None":
        """The store for a GGUF's ``blk.N.ffn_{gate,up,down}_exps`` tensors; None if it has none."""
        layers, n_expert, down_t = {}, {}, {}
        for name, info in g.tensors.items():
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] != "ffn_gate_exps":
                continue
            i = int(parts[1])
            infos = [g.tensors.get(f"blk.{i}.ffn_{p}_exps.weight") for p in PARTS]
            if any(t is None for t in infos):
                raise ValueError(f"{g.path}: layer {i} lacks one of the ffn_*_exps tensors")
            n_exp = infos[0].shape[0]
            planes = []
            for t in infos:
                if len(t.shape) != 3 or t.shape[0] != n_exp:
                    raise ValueError(f"{g.path}: {t.name} has shape {t.shape}, expected "
                                     f"({n_exp}, rows, cols)")
                planes.append(_Plane(t.qtype, tuple(t.shape[1:]), t.offset, t.nbytes // n_exp))
            layers[i] = tuple(planes)
            n_expert[i] = n_exp
            down_t[i] = down_transposed(infos[0].shape[1:], infos[2].shape[1:])
        if not layers:
            return None
        return cls(g.path, layers, n_expert, down_t, direct)

    def expert_bytes(self, layer: int) -> int:
        return sum(p.nbytes for p in self.layers[layer])

    def read(self, layer: int, e: int, slot: memoryview) -> list[int]:
        """Read expert ``e`` of ``layer`` into a page-aligned slot buffer; the planes' starts
        in it."""
        if self.direct:
            try:
                return self._read(layer, e, slot)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # the filesystem took O_DIRECT at open but refuses it on reads
                self.direct = False
                fd, self.fd = self.fd, os.open(self.path, os.O_RDONLY)
                os.close(fd)
        return self._read(layer, e, slot)

    def _read(self, layer: int, e: int, slot: memoryview) -> list[int]:
        starts, base = [], 0
        for plane, size in zip(self.layers[layer], self.region):
            off = plane.offset + e * plane.nbytes
            buf = slot[base:base + size]
            if self.direct:
                lead = off % ALIGN
                self._read_fully(buf[:_align_up(lead + plane.nbytes)], off - lead,
                                 lead + plane.nbytes)
                starts.append(base + lead)
            else:
                self._read_fully(buf[:plane.nbytes], off, plane.nbytes)
                os.posix_fadvise(self.fd, off, plane.nbytes, os.POSIX_FADV_DONTNEED)
                starts.append(base)
            base += size
        return starts

    def replay(self, keys: list, threads: int) -> float:
        """Read the experts ``keys`` ((layer, e) each, in order) with ``threads`` threads as
        the cache's I/O threads do, into scratch slots, computing nothing; returns the
        seconds taken: the read-bound time of the run that made the list."""
        import itertools
        import mmap
        import threading
        import time
        nxt = itertools.count()
        errors = []

        def work():
            # page-aligned, as the arena's slots; freed with its last view
            scratch = memoryview(mmap.mmap(-1, self.slot_bytes))
            try:
                while (i := next(nxt)) < len(keys):
                    self.read(*keys[i], scratch)
            except Exception as e:
                errors.append(e)
        pool = [threading.Thread(target=work) for _ in range(max(1, threads))]
        t0 = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - t0

    def _read_fully(self, buf: memoryview, off: int, need: int):
        got = 0
        while got < need:
            n = os.preadv(self.fd, [buf[got:]], off + got)
            if n <= 0:
                raise OSError(f"{self.path}: expert data ends early at byte {off + got}")
            got += n

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
