//! `rqemu-bench fs --check`: conformance checks of a vhost-user virtio-fs backend. Each check
//! prints PASS or FAIL with what the backend did; the exit status is non-zero if any failed.
//! Malformed requests must come back on the used ring (a guest would otherwise wait forever),
//! with a well-formed reply or none, without writes beyond the buffers given, and the daemon
//! must go on serving.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use rqemu_vhost_driver::fs::abi::{self, opcode as op, FUSE_ROOT_ID};
use rqemu_vhost_driver::fs::{self, FsOptions, FuseClient, INIT_FLAGS};
use rqemu_vhost_driver::{DriverError, ProtocolFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::ByteValued;

type Check = fn(&Path, Option<&str>) -> Result<String>;

fn opts(tag: Option<&str>, request_queues: u16) -> FsOptions {
    FsOptions {
        request_queues,
        mem_size: 16 << 20,
        max_payload: 256 << 10,
        tag: tag.map(str::to_string),
        ..Default::default()
    }
}

/// Connects; retries for a while if nobody listens yet or the listener goes away during the
/// handshake (a supervisor restarting a daemon that serves one frontend only, such as
/// virtiofsd, between checks).
fn with_retry<T>(mut f: impl FnMut() -> Result<T, fs::FsError>) -> Result<T> {
    let t = Instant::now();
    loop {
        match f() {
            Err(fs::FsError::Driver(
                DriverError::Connect { .. }
                | DriverError::VhostUser {
                    op: "SET_OWNER" | "GET_FEATURES",
                    ..
                },
            )) if t.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return Ok(r?),
        }
    }
}

fn client(sock: &Path, tag: Option<&str>) -> Result<FuseClient> {
    with_retry(|| FuseClient::connect_init(sock, &opts(tag, 1)))
}

fn device(
    sock: &Path,
    tag: Option<&str>,
) -> Result<(rqemu_vhost_driver::Device, Option<fs::FsConfig>)> {
    with_retry(|| fs::connect_device(sock, &opts(tag, 1)))
}

/// A fresh directory for one check's files.
fn scratch(c: &mut FuseClient, what: &str) -> Result<(String, u64)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("rqemu-check-{what}-{}-{nanos}", std::process::id());
    let e = c.mkdir(FUSE_ROOT_ID, &name, 0o755)?;
    Ok((name, e.nodeid))
}

fn expect_errno(
    what: &str,
    r: Result<impl std::fmt::Debug, fs::FsError>,
    want: &[i32],
) -> Result<i32> {
    match r {
        Err(e) => match e.errno() {
            Some(n) if want.contains(&n) => Ok(n),
            _ => bail!(
                "{what}: {e}, expected {}",
                want.iter()
                    .map(|&n| abi::errno_name(n))
                    .collect::<Vec<_>>()
                    .join("/")
            ),
        },
        Ok(v) => bail!("{what}: succeeded ({v:?}), expected an error"),
    }
}

fn negotiation(sock: &Path, tag: Option<&str>) -> Result<String> {
    let (d, _) = device(sock, tag)?;
    if d.offered_features & (1 << VIRTIO_F_VERSION_1) == 0 {
        bail!("VIRTIO_F_VERSION_1 not offered");
    }
    let proto = d.offered_protocol_features;
    let mut missing = Vec::new();
    for (f, name) in [
        (ProtocolFeatures::MQ, "MQ"),
        (
            ProtocolFeatures::CONFIG,
            "CONFIG (the frontend cannot learn the tag)",
        ),
    ] {
        if !proto.contains(f) {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        bail!("protocol features {proto:?} lack {}", missing.join(", "));
    }
    Ok(format!(
        "features {:#x} (negotiated {:#x}), protocol features {:?}",
        d.offered_features, d.features, proto
    ))
}

fn config_space(sock: &Path, tag: Option<&str>) -> Result<String> {
    let (mut d, cfg) = device(sock, tag)?;
    let cfg = cfg.ok_or_else(|| anyhow!("no configuration space (CONFIG not offered)"))?;
    let n = d.queue_num()?;
    if n < 1 + u64::from(cfg.num_request_queues) {
        bail!(
            "GET_QUEUE_NUM says {n}, the config space {} request queues + hiprio",
            cfg.num_request_queues
        );
    }
    let full = d.config(0, 40)?;
    let part = d.config(36, 4)?;
    if part != full[36..40] {
        bail!(
            "config read at offset 36 gives {part:?}, the full read {:?}",
            &full[36..40]
        );
    }
    Ok(format!(
        "tag {:?}, {} request queue(s), {n} queues in all",
        cfg.tag, cfg.num_request_queues
    ))
}

fn init(sock: &Path, tag: Option<&str>) -> Result<String> {
    let c = client(sock, tag)?;
    let i = c.init.ok_or_else(|| anyhow!("no INIT answer"))?;
    let extra = i.flags & !INIT_FLAGS;
    if extra != 0 {
        bail!("the server enabled INIT flags {extra:#x} the client did not offer");
    }
    if i.max_write < 4096 {
        bail!("max_write {} is below 4096", i.max_write);
    }
    Ok(format!(
        "FUSE 7.{}, flags {:#x}, max_write {}, max_pages {}",
        i.minor, i.flags, i.max_write, i.max_pages
    ))
}

fn basic_ops(sock: &Path, tag: Option<&str>) -> Result<String> {
    let mut c = client(sock, tag)?;
    let (dname, dir) = scratch(&mut c, "basic")?;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 + 1) as u8).collect();
    let (e, o) = c.create(dir, "file", libc::O_RDWR as u32, 0o640)?;
    if e.attr.mode & libc::S_IFMT != libc::S_IFREG {
        bail!("CREATE: mode {:o} is not a regular file", e.attr.mode);
    }
    c.write_all(e.nodeid, o.fh, 0, &data)?;
    c.flush(e.nodeid, o.fh)?;
    c.fsync(e.nodeid, o.fh)?;
    c.release(e.nodeid, o.fh, false)?;
    let l = c.lookup(dir, "file")?;
    if l.nodeid != e.nodeid {
        bail!(
            "LOOKUP gives node {} for the file CREATE made node {}",
            l.nodeid,
            e.nodeid
        );
    }
    let a = c.getattr(l.nodeid)?;
    if a.attr.size != data.len() as u64 || a.attr.mode & 0o777 != 0o640 {
        bail!(
            "GETATTR: size {} mode {:o}, expected {} and 640",
            a.attr.size,
            a.attr.mode,
            data.len()
        );
    }
    let fh = c.open(l.nodeid, libc::O_RDONLY as u32)?.fh;
    let mut back = Vec::new();
    while back.len() < data.len() {
        let chunk = c.read(l.nodeid, fh, back.len() as u64, 65536)?;
        if chunk.is_empty() {
            break;
        }
        back.extend(chunk);
    }
    let eof = c.read(l.nodeid, fh, data.len() as u64, 4096)?;
    c.release(l.nodeid, fh, false)?;
    if back != data {
        bail!(
            "READ gives back {} bytes that differ from the {} written",
            back.len(),
            data.len()
        );
    }
    if !eof.is_empty() {
        bail!("READ at end of file returned {} bytes", eof.len());
    }
    let sub = c.mkdir(dir, "sub", 0o700)?;
    let list = c.list_dir(dir, true)?;
    let mut names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    if !names.contains(&"file") || !names.contains(&"sub") {
        bail!("READDIRPLUS lists {names:?}");
    }
    for e in list
        .iter()
        .filter_map(|e| e.entry)
        .filter(|e| e.nodeid != 0)
    {
        c.forget(e.nodeid, 1)?;
    }
    let plain = c.list_dir(dir, false)?;
    if plain
        .iter()
        .filter(|e| e.name == "file" || e.name == "sub")
        .count()
        != 2
    {
        bail!(
            "READDIR lists {:?}",
            plain.iter().map(|e| &e.name).collect::<Vec<_>>()
        );
    }
    let st = c.statfs(FUSE_ROOT_ID)?;
    if st.bsize == 0 || st.namelen == 0 {
        bail!("STATFS: bsize {} namelen {}", st.bsize, st.namelen);
    }
    c.unlink(dir, "file")?;
    expect_errno(
        "LOOKUP after UNLINK",
        c.lookup(dir, "file"),
        &[libc::ENOENT],
    )?;
    c.rmdir(dir, "sub")?;
    c.rmdir(FUSE_ROOT_ID, &dname)?;
    c.forget(e.nodeid, 2)?;
    c.forget(sub.nodeid, 1)?;
    c.forget(dir, 1)?;
    c.getattr(FUSE_ROOT_ID)?;
    Ok(
        "MKDIR CREATE WRITE FLUSH FSYNC RELEASE LOOKUP GETATTR OPEN READ READDIR(PLUS) \
        STATFS UNLINK RMDIR FORGET"
            .into(),
    )
}

fn error_replies(sock: &Path, tag: Option<&str>) -> Result<String> {
    let mut c = client(sock, tag)?;
    let (dname, dir) = scratch(&mut c, "errors")?;
    let mut seen = Vec::new();
    let n = expect_errno(
        "LOOKUP of a missing name",
        c.lookup(dir, "missing"),
        &[libc::ENOENT],
    )?;
    seen.push(format!("missing name {}", abi::errno_name(n)));
    let (e, o) = c.create(dir, "f", libc::O_RDWR as u32, 0o600)?;
    c.release(e.nodeid, o.fh, false)?;
    let n = expect_errno(
        "second exclusive CREATE",
        c.create(dir, "f", libc::O_RDWR as u32, 0o600),
        &[libc::EEXIST],
    )?;
    seen.push(format!("CREATE existing {}", abi::errno_name(n)));
    let n = expect_errno(
        "READ with an unknown handle",
        c.read(e.nodeid, 0xdead_beef, 0, 4096),
        &[libc::EBADF, libc::EINVAL, libc::ENOENT],
    )?;
    seen.push(format!("bad handle {}", abi::errno_name(n)));
    let n = expect_errno(
        "GETATTR of an unknown node id",
        c.getattr(0x7777_0000_1234),
        &[libc::EBADF, libc::ENOENT, libc::EINVAL, libc::ESTALE],
    )?;
    seen.push(format!("bad node {}", abi::errno_name(n)));
    let n = expect_errno(
        "RMDIR of a non-empty directory",
        c.rmdir(FUSE_ROOT_ID, &dname),
        &[libc::ENOTEMPTY, libc::EEXIST],
    )?;
    seen.push(format!("non-empty RMDIR {}", abi::errno_name(n)));
    let n = expect_errno(
        "MKDIR over a file",
        c.mkdir(dir, "f", 0o700),
        &[libc::EEXIST],
    )?;
    seen.push(format!("MKDIR existing {}", abi::errno_name(n)));
    c.unlink(dir, "f")?;
    c.rmdir(FUSE_ROOT_ID, &dname)?;
    c.forget(e.nodeid, 1)?;
    c.forget(dir, 1)?;
    Ok(seen.join(", "))
}

fn unknown_opcode(sock: &Path, tag: Option<&str>) -> Result<String> {
    let mut c = client(sock, tag)?;
    expect_errno(
        "opcode 9999",
        c.call(9999, FUSE_ROOT_ID, &[&[0u8; 16]], 256),
        &[libc::ENOSYS],
    )?;
    c.getattr(FUSE_ROOT_ID)?;
    Ok("ENOSYS with the request's unique".into())
}

fn forget_hiprio(sock: &Path, tag: Option<&str>) -> Result<String> {
    let mut c = client(sock, tag)?;
    let (dname, dir) = scratch(&mut c, "forget")?;
    let n = c.lookup(FUSE_ROOT_ID, &dname)?.nodeid;
    c.forget(n, 1)?;
    // Forgetting more than was looked up, and an unknown node: no reply, no harm.
    c.forget(0x7777_0000_4321, 5)?;
    c.getattr(dir)?;
    c.rmdir(FUSE_ROOT_ID, &dname)?;
    c.forget(dir, 1)?;
    c.getattr(FUSE_ROOT_ID)?;
    Ok("FORGET chains (readable only) come back on the hiprio queue".into())
}

fn queue_stop(sock: &Path, tag: Option<&str>) -> Result<String> {
    let mut c = client(sock, tag)?;
    for _ in 0..3 {
        c.getattr(FUSE_ROOT_ID)?;
    }
    // INIT + 3 GETATTR on request queue 1.
    let base = c.dev.stop_queue(1)?;
    if base != 4 {
        bail!("GET_VRING_BASE returned {base} after 4 requests");
    }
    let hi = c.dev.stop_queue(0)?;
    if hi != 0 {
        bail!("GET_VRING_BASE of the idle hiprio queue returned {hi}");
    }
    // Set both up again on the same rings, as after a device reset, and use them.
    c.dev.restart_queue(1, base as u16)?;
    c.dev.restart_queue(0, 0)?;
    c.timeout = Duration::from_secs(3);
    c.getattr(FUSE_ROOT_ID)
        .map_err(|e| anyhow!("request queue restarted at {base}: {e}"))?;
    c.forget(0x7777_0000_4321, 1)
        .map_err(|e| anyhow!("hiprio queue restarted: {e}"))?;
    let again = c.dev.stop_queue(1)?;
    if again != 5 {
        bail!("GET_VRING_BASE returned {again} after a restart at 4 and one request");
    }
    Ok("GET_VRING_BASE reports the processed requests; queues restart where they stopped".into())
}

fn reconnect(sock: &Path, tag: Option<&str>) -> Result<String> {
    let mut c = client(sock, tag)?;
    let (dname, dir) = scratch(&mut c, "reconnect")?;
    drop(c);
    let mut c = client(sock, tag).map_err(|e| {
        anyhow!("second connection refused ({e:#}): the backend serves one frontend only")
    })?;
    let stale = c.getattr(dir);
    let looked = c.lookup(FUSE_ROOT_ID, &dname)?;
    c.rmdir(FUSE_ROOT_ID, &dname)?;
    c.forget(looked.nodeid, 1)?;
    match stale {
        Ok(_) if looked.nodeid == dir => Ok(format!(
            "INIT again works; node id {dir} was handed out again for the same directory"
        )),
        Ok(a) => bail!(
            "node id {dir} of the previous connection still resolves ({:?})",
            a.attr.ino
        ),
        Err(e) => Ok(format!("INIT again works; the old node id is gone ({e})")),
    }
}

fn multi_queue(sock: &Path, tag: Option<&str>) -> Result<String> {
    let (d, cfg) = device(sock, tag)?;
    drop(d);
    let n = cfg.map_or(1, |c| c.num_request_queues).min(8) as u16;
    if n < 2 {
        return Ok("one request queue".into());
    }
    let mut c = with_retry(|| FuseClient::connect_init(sock, &opts(tag, n)))?;
    for q in 1..=usize::from(n) {
        c.queue = q;
        c.getattr(FUSE_ROOT_ID)?;
    }
    Ok(format!("{n} request queues serve requests"))
}

/// A raw chain part: bytes of the request buffer, of the reply buffer, or any address.
#[derive(Debug, Clone, Copy)]
enum Part {
    Req(u32),
    Reply(u32),
    Addr(u64, u32, bool),
}

const CANARY: u8 = 0xa5;

/// Posts `req` (raw bytes) with `parts` on request queue 1, waits for it, and checks the
/// answer is well-formed, nothing was written past the reply room and the device still serves.
fn survives(
    sock: &Path,
    tag: Option<&str>,
    req: &[u8],
    parts: &[Part],
    unique: u64,
) -> Result<String> {
    let mut c = client(sock, tag)?;
    let s = c.slot();
    c.dev.mem.write(s.req, req)?;
    c.dev
        .mem
        .write(s.reply, &vec![CANARY; s.reply_cap as usize])?;
    let room: u32 = parts
        .iter()
        .map(|p| if let Part::Reply(n) = p { *n } else { 0 })
        .sum();
    let chain: Vec<(u64, u32, bool)> = parts
        .iter()
        .map(|p| match *p {
            Part::Req(n) => (s.req, n, false),
            Part::Reply(n) => (s.reply, n, true),
            Part::Addr(a, n, w) => (a, n, w),
        })
        .collect();
    let head = c.dev.queues[1].add(&c.dev.mem, &chain)?;
    c.dev.queues[1].kick()?;
    let t = Instant::now();
    let mut used = None;
    while t.elapsed() < Duration::from_secs(3) {
        if let Some((id, len)) = c.dev.queues[1].pop_used(&c.dev.mem)? {
            if id != head {
                bail!("used ring returned descriptor {id}, not {head}");
            }
            used = Some(len);
            break;
        }
        c.dev.queues[1].wait_call(Duration::from_millis(20))?;
    }
    let Some(used) = used else {
        c.timeout = Duration::from_secs(2);
        let alive = c.getattr(FUSE_ROOT_ID).is_ok();
        bail!(
            "the chain never came back on the used ring (a guest would wait forever); \
             device {}",
            if alive { "still serves" } else { "dead" }
        );
    };
    let mut after = vec![0u8; s.reply_cap as usize];
    c.dev.mem.read(s.reply, &mut after)?;
    if let Some(i) = after[room as usize..].iter().position(|&b| b != CANARY) {
        bail!(
            "the backend wrote past the {room}-byte reply room (at byte {})",
            room as usize + i
        );
    }
    let what = if used == 0 {
        "returned without a reply".to_string()
    } else {
        if used > room {
            bail!("used length {used} exceeds the {room} writable bytes");
        }
        let oh: abi::OutHeader =
            abi::decode(&after).ok_or_else(|| anyhow!("used length {used} but no out-header"))?;
        if used < 16 || oh.len != used {
            bail!("used length {used} with out-header {oh:?}");
        }
        if oh.unique != unique {
            bail!("reply unique {:#x} for request {unique:#x}", oh.unique);
        }
        match oh.error {
            0 => format!("answered OK with {} bytes", used - 16),
            e if e < 0 && used == 16 => format!("answered {}", abi::errno_name(-e)),
            e => bail!("malformed reply: error {e}, length {used}"),
        }
    };
    c.getattr(FUSE_ROOT_ID)
        .map_err(|e| anyhow!("{what}, then the device no longer serves: {e}"))?;
    Ok(format!("{what}; device still serves"))
}

fn header(opcode: u32, nodeid: u64, len: u32, unique: u64) -> Vec<u8> {
    let r = fs::Request {
        opcode,
        nodeid,
        unique,
        args: &[],
        reply_len: None,
    };
    fs::in_header(&r, len).as_slice().to_vec()
}

fn getattr_req(len: u32, unique: u64) -> Vec<u8> {
    let mut v = header(op::GETATTR, FUSE_ROOT_ID, len, unique);
    v.extend_from_slice(abi::GetattrIn::default().as_slice());
    v
}

const U: u64 = 0xc0de;

fn short_header(sock: &Path, tag: Option<&str>) -> Result<String> {
    survives(
        sock,
        tag,
        &getattr_req(56, U),
        &[Part::Req(20), Part::Reply(4096)],
        U,
    )
}

fn len_too_large(sock: &Path, tag: Option<&str>) -> Result<String> {
    survives(
        sock,
        tag,
        &getattr_req(56 + 8192, U),
        &[Part::Req(56), Part::Reply(4096)],
        U,
    )
}

fn len_too_small(sock: &Path, tag: Option<&str>) -> Result<String> {
    survives(
        sock,
        tag,
        &getattr_req(8, U),
        &[Part::Req(56), Part::Reply(4096)],
        U,
    )
}

fn len_short_of_args(sock: &Path, tag: Option<&str>) -> Result<String> {
    let mut v = header(op::LOOKUP, FUSE_ROOT_ID, 40, U);
    v.extend_from_slice(b"nonexistent-name\0");
    let n = v.len() as u32;
    survives(sock, tag, &v, &[Part::Req(n), Part::Reply(4096)], U)
}

fn huge_len(sock: &Path, tag: Option<&str>) -> Result<String> {
    survives(
        sock,
        tag,
        &getattr_req(u32::MAX, U),
        &[Part::Req(56), Part::Reply(4096)],
        U,
    )
}

fn no_writable(sock: &Path, tag: Option<&str>) -> Result<String> {
    survives(sock, tag, &getattr_req(56, U), &[Part::Req(56)], U)
}

fn writable_only(sock: &Path, tag: Option<&str>) -> Result<String> {
    survives(sock, tag, &[], &[Part::Reply(4096)], U)
}

fn reply_too_small(sock: &Path, tag: Option<&str>) -> Result<String> {
    survives(
        sock,
        tag,
        &getattr_req(56, U),
        &[Part::Req(56), Part::Reply(24)],
        U,
    )
}

fn outside_memory(sock: &Path, tag: Option<&str>) -> Result<String> {
    survives(
        sock,
        tag,
        &getattr_req(56, U),
        &[Part::Req(56), Part::Addr(0x7fff_0000_0000, 4096, true)],
        U,
    )
}

fn unknown_opcode_no_args(sock: &Path, tag: Option<&str>) -> Result<String> {
    survives(
        sock,
        tag,
        &header(0x00ff_ffff, FUSE_ROOT_ID, 40, U),
        &[Part::Req(40), Part::Reply(16)],
        U,
    )
}

/// A READ of 64 KiB into 4 KiB of reply room: nothing may be written past it.
fn read_overflow(sock: &Path, tag: Option<&str>) -> Result<String> {
    let mut c = client(sock, tag)?;
    let (dname, dir) = scratch(&mut c, "overflow")?;
    let (e, o) = c.create(dir, "big", libc::O_RDWR as u32, 0o600)?;
    c.write_all(e.nodeid, o.fh, 0, &vec![0x5au8; 65536])?;
    drop(c);
    let mut v = header(op::READ, e.nodeid, 80, U);
    v.extend_from_slice(
        abi::ReadIn {
            fh: o.fh,
            offset: 0,
            size: 65536,
            ..Default::default()
        }
        .as_slice(),
    );
    // The handle belongs to the first connection, gone now: the backend may refuse it (EBADF);
    // either way it must not overflow. Run it on a connection that owns its handle, too.
    let first = survives(sock, tag, &v, &[Part::Req(80), Part::Reply(16 + 4096)], U)?;
    let mut c = client(sock, tag)?;
    let l = c.lookup(FUSE_ROOT_ID, &dname)?;
    let f = c.lookup(l.nodeid, "big")?;
    let fh = c.open(f.nodeid, libc::O_RDONLY as u32)?.fh;
    let s = c.slot();
    let mut v = header(op::READ, f.nodeid, 80, U);
    v.extend_from_slice(
        abi::ReadIn {
            fh,
            offset: 0,
            size: 65536,
            ..Default::default()
        }
        .as_slice(),
    );
    c.dev.mem.write(s.req, &v)?;
    c.dev
        .mem
        .write(s.reply, &vec![CANARY; s.reply_cap as usize])?;
    let head = c.dev.queues[1].add(
        &c.dev.mem,
        &[(s.req, 80, false), (s.reply, 16 + 4096, true)],
    )?;
    c.dev.queues[1].kick()?;
    let used = c.wait(1, head, "READ")?;
    let mut after = vec![0u8; 16 + 8192];
    c.dev.mem.read(s.reply, &mut after)?;
    if after[16 + 4096..].iter().any(|&b| b != CANARY) {
        bail!("a 64 KiB READ into 4 KiB of room wrote past the room");
    }
    if used > 16 + 4096 {
        bail!("used length {used} exceeds the room");
    }
    let own = match abi::decode::<abi::OutHeader>(&after) {
        Some(oh) if used >= 16 && oh.len == used && oh.unique == U => match oh.error {
            0 => format!("answered OK with {} bytes", used - 16),
            e => format!("answered {}", abi::errno_name(-e)),
        },
        _ if used == 0 => "returned without a reply".to_string(),
        oh => bail!("used length {used} with out-header {oh:?}"),
    };
    c.release(f.nodeid, fh, false)?;
    c.unlink(l.nodeid, "big")?;
    c.rmdir(FUSE_ROOT_ID, &dname)?;
    c.forget(f.nodeid, 1)?;
    c.forget(l.nodeid, 1)?;
    Ok(format!(
        "stale handle: {first}; own handle: {own}, nothing past the room"
    ))
}

/// Runs every check; returns the number of failures.
pub fn run(sock: &Path, tag: Option<&str>) -> usize {
    let checks: [(&str, Check); 21] = [
        ("negotiation (VERSION_1, protocol features)", negotiation),
        ("config space (tag, num_request_queues)", config_space),
        ("FUSE_INIT", init),
        ("basic operations", basic_ops),
        ("error replies", error_replies),
        ("unknown opcode -> ENOSYS", unknown_opcode),
        ("FORGET on the hiprio queue", forget_hiprio),
        ("malformed: short in-header (20 bytes)", short_header),
        (
            "malformed: in-header len larger than the chain",
            len_too_large,
        ),
        (
            "malformed: in-header len smaller than the header",
            len_too_small,
        ),
        (
            "malformed: in-header len short of the arguments",
            len_short_of_args,
        ),
        ("malformed: in-header len 4 GiB", huge_len),
        ("malformed: request without writable part", no_writable),
        ("malformed: writable-only chain", writable_only),
        (
            "malformed: reply room smaller than the reply",
            reply_too_small,
        ),
        (
            "malformed: reply buffer outside guest memory",
            outside_memory,
        ),
        (
            "malformed: unknown opcode, 16 bytes of room",
            unknown_opcode_no_args,
        ),
        ("READ larger than the reply room", read_overflow),
        ("queue stop and restart (GET/SET_VRING_BASE)", queue_stop),
        ("reconnect", reconnect),
        ("multi-queue", multi_queue),
    ];
    crate::check::report(&checks, |f| f(sock, tag))
}
