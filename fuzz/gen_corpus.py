#!/usr/bin/env python3
"""Regenerates the seed corpora under fuzz/corpus/<target>/ (committed; run this only to change
them): valid inputs that take each fuzz target past its first checks.

- qcow2_image, qcow2_header: small qcow2 images of every feature rqemu reads (v2/v3, cluster
  sizes, refcount widths, allocated/zero/compressed/discarded clusters, lazy refcounts, a
  backing file, snapshots, extended L2 and an external data file, which rqemu refuses),
  made with qemu-img and qemu-io;
- blk_request: valid virtio-blk chains (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES,
  split data buffers) in the target's input layout (see fuzz_targets/blk_request.rs);
- fuse_request: one valid FUSE request per opcode rqemu-fs serves, against the target's rig
  (root = 1 opened as handle 2, file `f` = inode 2 opened as handle 1, `d` and `node`);
- net_tx_packet: vnet header + Ethernet frames (IPv4/IPv6, TCP/UDP, VLAN, checksum offload,
  TSO/UFO) with the offload selector byte first.

Usage: fuzz/gen_corpus.py   (needs qemu-img and qemu-io)
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- qcow2 images


def qcow2_seeds():
    tmp = tempfile.mkdtemp()

    def run(*args):
        subprocess.run(args, cwd=tmp, check=True, stdout=subprocess.DEVNULL)

    def io(img, *cmds, fmt="qcow2"):
        args = ["qemu-io", "-f", fmt]
        for c in cmds:
            args += ["-c", c]
        run(*args, img)

    images = {}

    def make(name, opts, size="128K", cmds=(), extra=()):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *extra, name, size)
        if cmds:
            io(name, *cmds)
        images[name] = name

    data = ("write -P 0x5a 0 4k", "write -P 0xa5 64k 1k", "write -P 0x11 100k 512")
    make("v2-c512.qcow2", "compat=0.10,cluster_size=512", cmds=data)
    make("v3-c512.qcow2", "compat=1.1,cluster_size=512", cmds=data)
    make("v3-c4k-empty.qcow2", "compat=1.1,cluster_size=4096")
    make(
        "v3-c512-zero-discard.qcow2",
        "compat=1.1,cluster_size=512",
        cmds=data + ("write -z 0 1k", "discard 64k 512", "write -z -u 100k 512"),
    )
    make("v3-c512-refcount1.qcow2", "compat=1.1,cluster_size=512,refcount_bits=1", cmds=data)
    make("v3-c512-refcount64.qcow2", "compat=1.1,cluster_size=512,refcount_bits=64", cmds=data)
    make("v3-c1k-lazy.qcow2", "compat=1.1,cluster_size=1024,lazy_refcounts=on", cmds=data)
    make("v3-c64k.qcow2", "compat=1.1", size="1M", cmds=("write -P 0x33 0 8k",))
    make("v3-c16k-extl2.qcow2", "compat=1.1,cluster_size=16384,extended_l2=on", cmds=data)
    make(
        "v3-c512-datafile.qcow2",
        "compat=1.1,cluster_size=512,data_file=data.raw",
    )
    # Compressed clusters: convert -c from a raw image with data.
    run("qemu-img", "create", "-q", "-f", "raw", "src.raw", "64K")
    io("src.raw", "write -P 0x77 0 32k", "write -P 0x01 40k 4k", fmt="raw")
    run(
        "qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o",
        "compat=1.1,cluster_size=4096", "src.raw", "v3-c4k-compressed.qcow2",
    )
    images["v3-c4k-compressed.qcow2"] = "v3-c4k-compressed.qcow2"
    # Backing file (relative name; the fuzz target's base directory does not hold it).
    make(
        "v3-c512-backing.qcow2",
        "compat=1.1,cluster_size=512,backing_file=src.raw,backing_fmt=raw",
        size="64K",
        cmds=("write -P 0x42 1k 1k",),
    )
    # An internal snapshot (snapshot table, refcounts > 1).
    make("v3-c512-snapshot.qcow2", "compat=1.1,cluster_size=512", cmds=data)
    run("qemu-img", "snapshot", "-c", "s1", "v3-c512-snapshot.qcow2")
    io("v3-c512-snapshot.qcow2", "write -P 0x99 0 2k")

    for name in sorted(images):
        with open(os.path.join(tmp, name), "rb") as f:
            img = f.read()
        seed = name.removesuffix(".qcow2")  # (*.qcow2 is git-ignored)
        put("qcow2_image", seed, img)
        # The header parser reads the header cluster.
        cluster = 1 << struct.unpack(">I", img[20:24])[0]
        put("qcow2_header", seed, img[: min(len(img), cluster)])
    shutil.rmtree(tmp)


# ---------------------------------------------------------------- virtio-blk chains

VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH = 0, 1, 4
VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES = 8, 11, 13
MEM_BASE = 0x1000  # where the target copies the bytes after the descriptors


def blk_chain(descs, mem):
    """descs: (addr, len, device_writable); mem: bytes placed at MEM_BASE."""
    out = bytes([len(descs) - 1])
    for addr, ln, w in descs:
        out += struct.pack("<IIB", addr, ln, 2 if w else 0) + b"\0" * 4
    return out + mem


def blk_seeds():
    def req(kind, sector, data=b"", writable=0, split=False, status_extra=0):
        hdr = struct.pack("<IIQ", kind, 0, sector)
        mem = hdr + data
        descs = [(MEM_BASE, 16, False)]
        if data:
            if split:
                h = len(data) // 2
                descs += [(MEM_BASE + 16, h, False), (MEM_BASE + 16 + h, len(data) - h, False)]
            else:
                descs.append((MEM_BASE + 16, len(data), False))
        if writable:
            at = MEM_BASE + len(mem)
            if split:
                h = writable // 2
                descs += [(at, h, True), (at + h, writable - h, True)]
            else:
                descs.append((at, writable, True))
            mem += b"\0" * writable
        descs.append((MEM_BASE + len(mem), 1 + status_extra, True))
        mem += b"\0" * (1 + status_extra)
        return blk_chain(descs, mem)

    seg = lambda sector, n, flags: struct.pack("<QII", sector, n, flags)  # noqa: E731
    put("blk_request", "in-1-sector", req(VIRTIO_BLK_T_IN, 3, writable=512))
    put("blk_request", "in-split", req(VIRTIO_BLK_T_IN, 8, writable=2048, split=True))
    put("blk_request", "out-1-sector", req(VIRTIO_BLK_T_OUT, 5, data=bytes(range(256)) * 2))
    put("blk_request", "out-split", req(VIRTIO_BLK_T_OUT, 100, data=b"\xab" * 1024, split=True))
    put("blk_request", "flush", req(VIRTIO_BLK_T_FLUSH, 0))
    put("blk_request", "get-id", req(VIRTIO_BLK_T_GET_ID, 0, writable=20))
    put("blk_request", "discard", req(VIRTIO_BLK_T_DISCARD, 0, data=seg(16, 8, 0)))
    put(
        "blk_request",
        "write-zeroes-unmap",
        req(VIRTIO_BLK_T_WRITE_ZEROES, 0, data=seg(4, 4, 1) + seg(40, 2, 0)),
    )
    put("blk_request", "in-last-sector", req(VIRTIO_BLK_T_IN, 127, writable=512))


# ---------------------------------------------------------------- FUSE requests


def fuse(opcode, nodeid, body=b"", unique=9):
    return struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, 0, 0, 1, 0, 0) + body


def fuse_seeds():
    z = lambda s: s + b"\0"  # noqa: E731
    read_in = lambda fh, off, size: struct.pack("<QQIIQII", fh, off, size, 0, 0, 0, 0)  # noqa
    lk = lambda fh, start, end, typ: struct.pack("<QQQQIIII", fh, 7, start, end, typ, 1, 0, 0)  # noqa
    F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
    seeds = {
        "init": fuse(26, 0, struct.pack("<IIII", 7, 31, 0x20000, 0x402)),
        "lookup": fuse(1, 1, z(b"f")),
        "forget": fuse(2, 2, struct.pack("<Q", 1)),
        "getattr": fuse(3, 2, struct.pack("<IIQ", 0, 0, 0)),
        "getattr-fh": fuse(3, 2, struct.pack("<IIQ", 1, 0, 1)),
        "setattr-size": fuse(
            4, 2, struct.pack("<IIQQQQQQIIIIIIII", 1 << 3 | 1 << 0, 0, 0, 4096, 0, 0, 0, 0,
                              0, 0, 0, 0o644, 0, 0, 0, 0)),
        "readlink": fuse(5, 2),
        "symlink": fuse(6, 1, z(b"ln") + z(b"f")),
        "mknod": fuse(8, 1, struct.pack("<IIII", 0o100644, 0, 0o22, 0) + z(b"node2")),
        "mkdir": fuse(9, 1, struct.pack("<II", 0o755, 0o22) + z(b"d2")),
        "unlink": fuse(10, 1, z(b"node")),
        "rmdir": fuse(11, 1, z(b"d")),
        "rename": fuse(12, 1, struct.pack("<Q", 1) + z(b"f") + z(b"g")),
        "link": fuse(13, 1, struct.pack("<Q", 2) + z(b"hard")),
        "open": fuse(14, 2, struct.pack("<II", 2, 0)),
        "read": fuse(15, 2, read_in(1, 0, 4096)),
        "write": fuse(16, 2, struct.pack("<QQIIQII", 1, 100, 16, 0, 0, 0, 0) + b"W" * 16),
        "statfs": fuse(17, 1),
        "release": fuse(18, 2, struct.pack("<QIIQ", 1, 2, 0, 0)),
        "fsync": fuse(20, 2, struct.pack("<QII", 1, 1, 0)),
        "setxattr": fuse(21, 2, struct.pack("<II", 3, 0) + z(b"user.a") + b"xyz"),
        "getxattr": fuse(22, 2, struct.pack("<II", 64, 0) + z(b"user.a")),
        "listxattr": fuse(23, 2, struct.pack("<II", 256, 0)),
        "removexattr": fuse(24, 2, z(b"user.a")),
        "flush": fuse(25, 2, struct.pack("<QIIQ", 1, 0, 0, 7)),
        "opendir": fuse(27, 1, struct.pack("<II", 0, 0)),
        "readdir": fuse(28, 1, read_in(2, 0, 4096)),
        "readdirplus": fuse(44, 1, read_in(2, 0, 4096)),
        "releasedir": fuse(29, 1, struct.pack("<QIIQ", 2, 0, 0, 0)),
        "fsyncdir": fuse(30, 1, struct.pack("<QII", 2, 0, 0)),
        "getlk": fuse(31, 2, lk(1, 0, 100, F_WRLCK)),
        "setlk": fuse(32, 2, lk(1, 0, 100, F_RDLCK)),
        "setlk-unlock": fuse(32, 2, lk(1, 0, 2**63 - 1, F_UNLCK)),
        "setlkw": fuse(33, 2, lk(1, 200, 300, F_WRLCK)),
        "flock": fuse(32, 2, struct.pack("<QQQQIIII", 1, 7, 0, 2**63 - 1, F_WRLCK, 1, 1, 0)),
        "access": fuse(34, 2, struct.pack("<II", 4, 0)),
        "create": fuse(35, 1, struct.pack("<IIII", 0o102, 0o100644, 0o22, 0) + z(b"new")),
        "interrupt": fuse(36, 0, struct.pack("<Q", 5)),
        "destroy": fuse(38, 0),
        "batch-forget": fuse(42, 0, struct.pack("<IIQQ", 1, 0, 2, 1)),
        "fallocate": fuse(43, 2, struct.pack("<QQQII", 1, 0, 8192, 0, 0)),
        "rename2": fuse(45, 1, struct.pack("<QII", 1, 1, 0) + z(b"f") + z(b"h")),
        "lseek": fuse(46, 2, struct.pack("<QQII", 1, 0, 3, 0)),
        "copy-file-range": fuse(47, 2, struct.pack("<QQQQQQQ", 1, 0, 2, 1, 4096, 100, 0)),
        "syncfs": fuse(50, 1, struct.pack("<Q", 0)),
    }
    for name, data in seeds.items():
        put("fuse_request", name, data)


# ---------------------------------------------------------------- virtio-net TX


def csum16(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def net_seeds():
    mac = b"\x52\x54\x00\x12\x34\x56" + b"\x52\x54\x00\x65\x43\x21"

    def ipv4(proto, payload):
        h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                        bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        h = h[:10] + struct.pack("!H", csum16(h)) + h[12:]
        return h + payload

    def ipv6(proto, payload):
        return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64,
                           b"\xfd" + b"\0" * 14 + b"\x01", b"\xfd" + b"\0" * 14 + b"\x02") + payload

    def tcp(data):
        return struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + data

    def udp(data):
        return struct.pack("!HHHH", 40000, 53, 8 + len(data), 0) + data

    eth4 = lambda p: mac + b"\x08\x00" + p  # noqa: E731
    eth6 = lambda p: mac + b"\x86\xdd" + p  # noqa: E731
    vlan4 = lambda p: mac + b"\x81\x00\x00\x05\x08\x00" + p  # noqa: E731

    def hdr(flags=0, gso=0, hdr_len=0, gso_size=0, cs=0, co=0):
        return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, cs, co, 0)

    ALL = 0x0F  # csum, tso4, tso6, ufo; MTU 576 + 15 * 32
    seeds = {
        "plain-tcp4": bytes([0]) + hdr() + eth4(ipv4(6, tcp(b"x" * 100))),
        "plain-udp6": bytes([0]) + hdr() + eth6(ipv6(17, udp(b"y" * 64))),
        "vlan-udp4": bytes([0]) + hdr() + vlan4(ipv4(17, udp(b"z" * 32))),
        "csum-tcp4": bytes([1]) + hdr(1, 0, 0, 0, 34, 16) + eth4(ipv4(6, tcp(b"c" * 200))),
        "csum-udp6": bytes([1]) + hdr(1, 0, 0, 0, 54, 6) + eth6(ipv6(17, udp(b"u" * 50))),
        "tso4": bytes([ALL]) + hdr(1, 1, 54, 1448, 34, 16) + eth4(ipv4(6, tcp(b"t" * 4000))),
        "tso6": bytes([ALL]) + hdr(1, 4, 74, 1428, 54, 16) + eth6(ipv6(6, tcp(b"s" * 3000))),
        "ufo4": bytes([ALL]) + hdr(1, 3, 42, 1472, 34, 6) + eth4(ipv4(17, udp(b"f" * 3000))),
        "tso4-ecn": bytes([ALL]) + hdr(1, 0x81, 54, 1448, 34, 16)
        + eth4(ipv4(6, tcp(b"e" * 3000))),
        "min-frame": bytes([0]) + hdr() + mac + b"\x08\x06",
    }
    for name, data in seeds.items():
        put("net_tx_packet", name, data)


def main():
    for t in ("qcow2_image", "qcow2_header", "blk_request", "fuse_request", "net_tx_packet"):
        shutil.rmtree(os.path.join(CORPUS, t), ignore_errors=True)
    qcow2_seeds()
    blk_seeds()
    fuse_seeds()
    net_seeds()
    total = sum(
        os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(CORPUS) for f in fs
    )
    print(f"fuzz corpora: {total} bytes under {CORPUS}")
    if total > 2 << 20:
        sys.exit("fuzz corpora over 2 MiB: keep the committed seeds small")


if __name__ == "__main__":
    main()
