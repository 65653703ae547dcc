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
  TSO/UFO) with the offload selector byte first;
- fwd_to_daemon, fwd_to_vmm: forwarding-protocol messages in both directions (HELLO, GRANT,
  REFUSE, framed accesses and replies, postcard control messages and replies, ring slots),
  after the targets' selector byte;
- vhost_user_backend: vhost-user frontend sessions (negotiation, config, memory table, queue
  set-up and start, stop, memory regions added and removed, replies asked for);
- virtio_mmio: a virtio-mmio driver's register sequence (reset, feature negotiation, queue
  set-up, DRIVER_OK, notify, config accesses) as 8-byte accesses;
- vsock_session: rqemu-vsock guest sessions (guest and host connections, data, credit,
  shutdown, refusals, invalid packets) in rqemu_vsock_backend::fuzz's command layout;
- tcg_code: guest code for the software CPU (a real-mode SIPI trampoline into long mode, 64-bit
  programs, a switch to compatibility mode, real-mode snippets) after the mode selector byte;
- agent_msg_frames: the guest agent's frames as rqemu-run reads them (length + postcard
  AgentMsg: Ready, Created, Started, Stdout/Stderr, Exited, Error; a conversation in one stream).

Usage: fuzz/gen_corpus.py [qcow2|blk|fuse|net|fwd|mmio|vhost|vsock|agent|tcg]...   (qcow2 needs qemu-img and qemu-io)
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


# ---------------------------------------------------------------- forwarding protocol

MAGIC = b"RQEMUFWD"


def hs_header(ty, length):
    return MAGIC + struct.pack("<HHI", 1, ty, length)


def window(space, base, size, flags=0):
    return struct.pack("<BB6xQQ", space, flags, base, size)


def hello(cls, name, features, windows, irqs):
    b = bytearray(320)
    b[0:16] = hs_header(1, 320)
    struct.pack_into("<HBB", b, 16, cls, len(windows), len(irqs))
    struct.pack_into("<Q", b, 24, features)
    b[32 : 32 + len(name)] = name
    for i, w in enumerate(windows):
        b[64 + i * 24 : 88 + i * 24] = window(*w)
    for i, (trigger, hint) in enumerate(irqs):
        struct.pack_into("<B3xI", b, 256 + i * 8, trigger, hint)
    return bytes(b)


def grant(features, vcpus, windows, gsis):
    b = bytearray(256)
    b[0:16] = hs_header(2, 256)
    struct.pack_into("<BBH", b, 16, len(windows), len(gsis), vcpus)
    struct.pack_into("<Q", b, 24, features)
    for i, w in enumerate(windows):
        b[32 + i * 24 : 56 + i * 24] = window(*w)
    for i, g in enumerate(gsis):
        struct.pack_into("<I", b, 224 + i * 4, g)
    return bytes(b)


def refuse(reason):
    b = bytearray(128)
    b[0:16] = hs_header(3, 128)
    b[16 : 16 + len(reason)] = reason
    return bytes(b)


def fwd_frame(tag, payload):
    return struct.pack("<II", tag, len(payload)) + payload


def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def access(seq, op, space, length, addr, data):
    return struct.pack("<QBBB5xQQ", seq, op, space, length, addr, data)


def ring_slot(seq, op, space, length, addr, data, resp_seq=0, status=0, resp=0):
    return struct.pack("<QBBB5xQQQB7xQQ", seq, op, space, length, addr, data, resp_seq, status, resp, 0)


def fwd_seeds():
    serial = hello(1, b"rqemu-serial", 7, [(0, 0x3F8, 8, 1)], [(0, 4)])
    rtc = hello(2, b"rqemu-rtc", 5, [(0, 0x70, 2)], [(0, 8), (1, 0xFFFFFFFF)])
    mmio = hello(7, b"other", 1, [(1, 0xD000_0000, 0x1000), (0, 0x500, 16)], [])
    for name, h in [("hello-serial", serial), ("hello-rtc", rtc), ("hello-mmio", mmio)]:
        put("fwd_to_vmm", name, b"\x00" + h)
    put("fwd_to_vmm", "access-reply", b"\x01" + fwd_frame(0x11, struct.pack("<QB7xQ", 5, 0, 0x41)))
    for name, body in [
        ("control-ok", b"\x00"),
        ("control-state", b"\x01" + varint(6) + b"state!"),
        ("control-error", b"\x02" + varint(7) + b"refused"),
    ]:
        put("fwd_to_vmm", name, b"\x01" + fwd_frame(0x21, body))
    done = bytearray(8192)
    struct.pack_into("<Q", done, 128, 3)
    done[256 + 2 * 64 : 256 + 3 * 64] = ring_slot(3, 1, 0, 1, 0x71, 0, 3, 0, 0x59)
    put("fwd_to_vmm", "ring-done", b"\x02" + struct.pack("<Q", 3) + bytes(done[:448]))
    put("fwd_to_vmm", "ring-pending", b"\x02" + struct.pack("<Q", 1) + bytes(256 + 64))

    put("fwd_to_daemon", "grant", b"\x01" + grant(5, 2, [(0, 0x3F8, 8, 1)], [4]))
    put("fwd_to_daemon", "grant-two", b"\x01" + grant(1, 1, [(1, 0xD000_0000, 0x1000), (0, 0x70, 2)], [8, 9]))
    put("fwd_to_daemon", "refuse", b"\x01" + refuse(b"window 0x3f8 is taken"))
    for name, a in [
        ("access-read", access(1, 1, 0, 1, 0x3FD, 0)),
        ("access-write", access(2, 2, 0, 2, 0x70, 0x8B)),
        ("access-posted", access(3, 3, 1, 8, 0xD000_0010, 0x1122334455667788)),
    ]:
        put("fwd_to_daemon", name, b"\x00" + fwd_frame(0x10, a))
    irq_lines = varint(2) + b"\x00" + varint(4) + b"\x00" + b"\x01" + varint(8) + b"\x01"
    regions = varint(1) + varint(0) + varint(0x4000000) + varint(0)
    for name, body in [
        ("control-set-rings", b"\x00" + varint(2)),
        ("control-set-irqfds", b"\x01" + irq_lines),
        ("control-set-mem-table", b"\x02" + regions),
        ("control-reset", b"\x03"),
        ("control-shutdown", b"\x04"),
        ("control-snapshot", b"\x05"),
        ("control-restore", b"\x06" + varint(4) + b"\x01\x02\x03\x04"),
    ]:
        put("fwd_to_daemon", name, b"\x00" + fwd_frame(0x20, body))
    slots = ring_slot(1, 1, 0, 1, 0x71, 0) + ring_slot(2, 2, 0, 1, 0x70, 0x0A)
    put("fwd_to_daemon", "ring-two", b"\x02" + struct.pack("<Q", 2) + slots)


# ---------------------------------------------------------------- virtio-mmio


def mmio_seeds():
    def w(off, v, size=2):
        return struct.pack("<BHBI", 1, off, size, v)

    def r(off, size=2):
        return struct.pack("<BHBI", 0, off, size, 0)

    probe = r(0x000) + r(0x004) + r(0x008) + r(0x00C)
    nego = (
        w(0x070, 0) + w(0x070, 1) + w(0x070, 3)
        + w(0x014, 0) + r(0x010) + w(0x014, 1) + r(0x010)
        + w(0x024, 0) + w(0x020, 1 << 28) + w(0x024, 1) + w(0x020, 1)
        + w(0x070, 11) + r(0x070)
    )

    def queue(i, size):
        base = 0x100000 * (i + 1)
        return (
            w(0x030, i) + r(0x034) + w(0x038, size)
            + w(0x080, base) + w(0x084, 0) + w(0x090, base + 0x1000) + w(0x094, 0)
            + w(0x0A0, base + 0x2000) + w(0x0A4, 0) + w(0x044, 1) + r(0x044)
        )

    live = probe + nego + queue(0, 128) + queue(1, 64) + w(0x070, 15) + w(0x050, 0) + r(0x060) + w(0x064, 1)
    put("virtio_mmio", "probe", probe)
    put("virtio_mmio", "activate", live)
    put("virtio_mmio", "activate-then-reset", live + w(0x070, 0) + r(0x070) + probe + nego)
    put("virtio_mmio", "config", probe + r(0x100, 0) + r(0x104) + w(0x108, 0xAB, 0) + w(0x10C, 0x1234, 1) + r(0x10C, 3) + r(0x0FC))
    put("virtio_mmio", "bad-queue-size", probe + nego + queue(0, 100) + queue(1, 512) + w(0x070, 15) + r(0x070))
    put("virtio_mmio", "shm", r(0x0AC) + w(0x0AC, 1) + r(0x0B0) + r(0x0B4) + r(0x0B8) + r(0x0BC))


GENERATORS = {
    "qcow2": (("qcow2_image", "qcow2_header"), lambda: qcow2_seeds()),
    "blk": (("blk_request",), lambda: blk_seeds()),
    "fuse": (("fuse_request",), lambda: fuse_seeds()),
    "net": (("net_tx_packet",), lambda: net_seeds()),
    "fwd": (("fwd_to_daemon", "fwd_to_vmm"), lambda: fwd_seeds()),
    "mmio": (("virtio_mmio",), lambda: mmio_seeds()),
    "vhost": (("vhost_user_backend",), lambda: vhost_seeds()),
    "vsock": (("vsock_session",), lambda: vsock_seeds()),
    "agent": (("agent_msg_frames",), lambda: agent_seeds()),
    "tcg": (("tcg_code",), lambda: tcg_seeds()),
}


# ---------------------------------------------------------------- software CPU code
def tcg_seeds():
    import re

    src = os.path.join(HERE, "..", "vmm", "tcg", "tests", "system")
    def image(name):
        text = open(os.path.join(src, name)).read()
        body = re.search(r"IMAGE: &\[u8\] = &\[(.*?)\];", text, re.S).group(1)
        return bytes(int(x, 16) for x in re.findall(r"0x([0-9a-f]{2})", body))
    # Real mode from the SIPI state through protected mode into long mode (tests/asm/modes.S).
    put("tcg_code", "sipi-trampoline", b"\x01" + image("modes_image.rs"))
    # 64-bit: the system tests' guest program (linked elsewhere: exercises decoding and faults).
    put("tcg_code", "guest64", b"\x00" + image("image.rs"))
    # 64-bit loop: mov ecx, 100; add rax, rcx; loop; hlt.
    put("tcg_code", "loop64", b"\x00" + bytes.fromhex("b964000000" "4801c8" "e2fb" "f4"))
    # 64-bit to compatibility mode: push 0x08; lea rax, [rip+3]; push rax; retfq; then 32-bit
    # mov eax, 1; push eax; pop ebx; hlt.
    put("tcg_code", "to-compat", b"\x00" + bytes.fromhex("6a08" "488d0503000000" "50" "48cb" "b801000000" "50" "5b" "f4"))
    # Real mode: mov ax, 0x1234; push ax; pop bx; mov [bx+si+2], ax; int 0x10 (vector 0 → IVT); hlt.
    put("tcg_code", "real16", b"\x01" + bytes.fromhex("b83412" "50" "5b" "894002" "cd10" "f4"))


# ---------------------------------------------------------------- rqemu-agent frames


def agent_seeds():
    # postcard: enum variant and integers as LEB128 varints (signed ones zigzagged), byte
    # strings and strings as varint length + bytes; each frame a u32 LE length first.
    def uv(v):
        out = b""
        while True:
            b = v & 0x7F
            v >>= 7
            if v:
                out += bytes([b | 0x80])
            else:
                return out + bytes([b])

    def zz(v):
        return uv((v << 1) ^ (v >> 31))

    def blob(b):
        return uv(len(b)) + b

    def frame(body):
        return struct.pack("<I", len(body)) + body

    ready = frame(uv(0) + uv(1) + blob(b"6.1.0-57-cloud-amd64"))
    created = frame(uv(1))
    started = frame(uv(2) + uv(81))
    out = frame(uv(3) + blob(b"hello\n"))
    err = frame(uv(4) + blob(b"warn\n" * 40))
    code = frame(uv(5) + uv(0) + zz(7))
    sig = frame(uv(5) + uv(1) + zz(15))
    error = frame(uv(6) + blob(b"execve /bin/nope: No such file or directory"))
    put("agent_msg_frames", "conversation", ready + created + started + out + err + code)
    put("agent_msg_frames", "signal-death", ready + created + started + sig)
    put("agent_msg_frames", "start-error", ready + created + error)
    put("agent_msg_frames", "truncated", ready + out[:-3])


# ---------------------------------------------------------------- vsock


def vsock_seeds():
    # Commands of rqemu_vsock_backend::fuzz: 0 guest packet, 1 RX buffer, 2 host events,
    # 3 host data, 4 host CONNECT.
    OP = dict(request=1, response=2, rst=3, shutdown=4, rw=5, credit_update=6, credit_request=7)

    def pkt(op, src_port, dst_port, payload=b"", flags=0, buf_alloc=65536, fwd_cnt=0, src_cid=3,
            dst_cid=2, typ=1):
        h = struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, len(payload), typ,
                        OP[op], flags, buf_alloc, fwd_cnt)
        p = h + payload
        return bytes([0]) + struct.pack("<H", len(p)) + p

    rx = lambda room=4096: bytes([1]) + struct.pack("<H", room)  # noqa: E731
    events = bytes([2])
    host_data = lambda n: bytes([3, n])  # noqa: E731
    connect = lambda port: bytes([4, port])  # noqa: E731
    drain = rx() * 4

    put("vsock_session", "guest-connect-rw",
        pkt("request", 1000, 1) + drain + pkt("rw", 1000, 1, b"hello") + host_data(50)
        + events + drain + pkt("shutdown", 1000, 1, flags=3) + drain)
    put("vsock_session", "guest-refused", pkt("request", 1000, 7) + drain)
    put("vsock_session", "host-connect",
        connect(9) + events + drain + pkt("response", 9, 1 << 30) + host_data(20) + events + drain
        + pkt("rst", 9, 1 << 30) + drain)
    put("vsock_session", "credit",
        pkt("request", 1000, 2, buf_alloc=10) + drain + host_data(100) + events + drain
        + pkt("credit_update", 1000, 2, buf_alloc=100, fwd_cnt=10) + drain
        + pkt("credit_request", 1000, 2) + drain)
    put("vsock_session", "bad-packets",
        pkt("rw", 1, 2, b"x") + pkt("request", 1, 2, src_cid=9) + pkt("request", 1, 2, typ=2)
        + bytes([0, 10, 0]) + bytes(10) + drain)


# ---------------------------------------------------------------- vhost-user


def vu(req, payload=b"", flags=1):
    return struct.pack("<III", req, flags, len(payload)) + payload


def vhost_seeds():
    ua = 0x7000_0000_0000
    hello = vu(1) + vu(3) + vu(15) + vu(16, struct.pack("<Q", 0x8001)) + vu(17)
    feats = vu(2, struct.pack("<Q", (1 << 32) | (1 << 29) | (1 << 30)))
    config = vu(24, struct.pack("<III", 0, 8, 0) + bytes(8)) + vu(24, struct.pack("<III", 0xF00, 64, 0) + bytes(64))
    mem = vu(5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20, ua, 0))

    def ring(i, num):
        base = ua + 0x10000 * (i + 1)
        return (
            vu(8, struct.pack("<II", i, num))
            + vu(9, struct.pack("<IIQQQQ", i, 0, base, base + 0x2000, base + 0x1000, 0))
            + vu(10, struct.pack("<II", i, 0))
            + vu(13, struct.pack("<Q", i))
            + vu(12, struct.pack("<Q", i))
            + vu(18, struct.pack("<II", i, 1))
        )

    put("vhost_user_backend", "negotiate", hello + feats + config)
    put("vhost_user_backend", "start-queues", hello + feats + mem + ring(0, 128) + ring(1, 64))
    put("vhost_user_backend", "start-stop", hello + feats + mem + ring(0, 256) + vu(11, struct.pack("<II", 0, 0)) + vu(4))
    put("vhost_user_backend", "mem-add-remove", hello + vu(36) + vu(37, struct.pack("<Q", 0) + struct.pack("<QQQQ", 0, 1 << 20, ua, 0)) + vu(38, struct.pack("<Q", 0) + struct.pack("<QQQQ", 0, 1 << 20, ua, 0)))
    put("vhost_user_backend", "need-reply", vu(1) + vu(16, struct.pack("<Q", 0x8009)) + vu(2, struct.pack("<Q", 1 << 32), flags=9) + vu(24, struct.pack("<III", 4, 4, 0) + bytes(4), flags=9))


def main():
    # fuzz/gen_corpus.py [GROUP...]: only these groups (default: all; qcow2 needs qemu-img).
    groups = sys.argv[1:] or list(GENERATORS)
    for g in groups:
        targets, gen = GENERATORS[g]
        for t in targets:
            shutil.rmtree(os.path.join(CORPUS, t), ignore_errors=True)
        gen()
    total = sum(
        os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(CORPUS) for f in fs
    )
    print(f"fuzz corpora: {total} bytes under {CORPUS}")
    if total > 2 << 20:
        sys.exit("fuzz corpora over 2 MiB: keep the committed seeds small")


if __name__ == "__main__":
    main()
