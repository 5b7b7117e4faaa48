//! A file system for fault tests, in the spirit of LazyFS (the FUSE file
//! system Jepsen finds lost-write bugs with): it keeps every file in
//! memory, and what was written but not yet fsynced separately from what
//! was, so that a simulated power cut throws the unsynced part away as
//! losing the page cache would. Metadata (creating, renaming, removing a
//! file) is kept at once, as LazyFS does. It can also fail: every write
//! and sync answered with EIO, or every sync made slow (a stalled disk).
//!
//! Mounted with the `fuser` crate (no libfuse: `fusermount3` from Debian's
//! `fuse3` does the mount) in a thread of the test process; the gateway
//! under test is the real binary in its own process, writing through the
//! kernel to it. Files are opened with direct I/O and attributes are not
//! cached, so nothing the kernel keeps survives a cut that this file
//! system does not.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use parking_lot::Mutex;

/// How the disk behaves now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Every write, sync and truncation fails with EIO (reads still work).
    Eio,
    /// Every sync waits this long first: the disk is stalled.
    SlowSync(Duration),
}

const ROOT: u64 = 1;
const TTL: Duration = Duration::ZERO;
const BLOCK: u32 = 4096;

enum Node {
    File {
        /// What a reader sees now.
        data: Vec<u8>,
        /// What has reached the "disk": `data` as of the last sync.
        synced: Vec<u8>,
        /// The lowest offset changed since the last sync (`None`: clean).
        dirty_from: Option<usize>,
    },
    Dir {
        children: BTreeMap<OsString, u64>,
    },
}

struct Inode {
    node: Node,
    perm: u16,
    mtime: SystemTime,
    parent: u64,
}

struct State {
    inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    mode: Mode,
    /// Power cuts so far.
    cuts: u64,
}

impl State {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let i = self.inodes.get(&ino)?;
        let (kind, size, nlink) = match &i.node {
            Node::File { data, .. } => (FileType::RegularFile, data.len() as u64, 1),
            Node::Dir { .. } => (FileType::Directory, 0, 2),
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: i.mtime,
            mtime: i.mtime,
            ctime: i.mtime,
            crtime: i.mtime,
            kind,
            perm: i.perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        match &self.inodes.get(&parent)?.node {
            Node::Dir { children } => children.get(name).copied(),
            Node::File { .. } => None,
        }
    }

    fn children_mut(&mut self, parent: u64) -> Option<&mut BTreeMap<OsString, u64>> {
        match &mut self.inodes.get_mut(&parent)?.node {
            Node::Dir { children } => Some(children),
            Node::File { .. } => None,
        }
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node, perm: u16) -> Result<u64, i32> {
        if self.child(parent, name).is_some() {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                node,
                perm,
                mtime: SystemTime::now(),
                parent,
            },
        );
        self.children_mut(parent)
            .ok_or(libc::ENOTDIR)?
            .insert(name.to_owned(), ino);
        Ok(ino)
    }

    fn remove_tree(&mut self, ino: u64) {
        if let Some(Inode {
            node: Node::Dir { children },
            ..
        }) = self.inodes.remove(&ino)
        {
            for c in children.into_values() {
                self.remove_tree(c);
            }
        }
    }

    /// The power goes: every file falls back to what was synced.
    fn cut(&mut self) {
        for i in self.inodes.values_mut() {
            if let Node::File {
                data,
                synced,
                dirty_from,
            } = &mut i.node
            {
                *data = synced.clone();
                *dirty_from = None;
            }
        }
        self.cuts += 1;
    }
}

/// The FUSE side: each request takes the state's lock.
struct Fs(Arc<Mutex<State>>);

fn file_mut(
    s: &mut State,
    ino: u64,
) -> Result<(&mut Vec<u8>, &mut Vec<u8>, &mut Option<usize>), i32> {
    match s.inodes.get_mut(&ino).map(|i| &mut i.node) {
        Some(Node::File {
            data,
            synced,
            dirty_from,
        }) => Ok((data, synced, dirty_from)),
        Some(Node::Dir { .. }) => Err(libc::EISDIR),
        None => Err(libc::ENOENT),
    }
}

fn mark_dirty(dirty_from: &mut Option<usize>, at: usize) {
    *dirty_from = Some(dirty_from.map_or(at, |d| d.min(at)));
}

/// Makes a file's data durable: only what changed since the last sync is
/// copied (the journal's files grow by appends).
fn sync_file(data: &[u8], synced: &mut Vec<u8>, dirty_from: &mut Option<usize>) {
    if let Some(from) = dirty_from.take() {
        let from = from.min(synced.len()).min(data.len());
        synced.truncate(from);
        synced.extend_from_slice(&data[from..]);
    }
    synced.truncate(data.len());
}

impl Filesystem for Fs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let s = self.0.lock();
        match s.child(parent, name).and_then(|ino| s.attr(ino)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.0.lock().attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut s = self.0.lock();
        if let Some(size) = size {
            if s.mode == Mode::Eio {
                return reply.error(libc::EIO);
            }
            match file_mut(&mut s, ino) {
                Ok((data, _, dirty_from)) => {
                    let size = size as usize;
                    if size < data.len() {
                        mark_dirty(dirty_from, size);
                    } else {
                        mark_dirty(dirty_from, data.len());
                    }
                    data.resize(size, 0);
                }
                Err(e) => return reply.error(e),
            }
        }
        if let Some(i) = s.inodes.get_mut(&ino) {
            if let Some(m) = mode {
                i.perm = (m & 0o7777) as u16;
            }
            i.mtime = SystemTime::now();
        }
        match s.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.0.lock();
        let node = Node::Dir {
            children: BTreeMap::new(),
        };
        match s.add(parent, name, node, (mode & 0o7777) as u16) {
            Ok(ino) => reply.entry(&TTL, &s.attr(ino).expect("just added"), 0),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.0.lock();
        let node = Node::File {
            data: Vec::new(),
            synced: Vec::new(),
            dirty_from: None,
        };
        match s.add(parent, name, node, (mode & 0o7777) as u16) {
            Ok(ino) => reply.created(
                &TTL,
                &s.attr(ino).expect("just added"),
                0,
                0,
                fuser::consts::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.0.lock();
        match s.children_mut(parent).and_then(|c| c.remove(name)) {
            Some(ino) => {
                s.remove_tree(ino);
                reply.ok()
            }
            None => reply.error(libc::ENOENT),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.0.lock();
        let Some(ino) = s.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        if matches!(&s.inodes[&ino].node, Node::Dir { children } if !children.is_empty()) {
            return reply.error(libc::ENOTEMPTY);
        }
        s.children_mut(parent).expect("a directory").remove(name);
        s.remove_tree(ino);
        reply.ok()
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.0.lock();
        let Some(ino) = s.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        if s.children_mut(newparent).is_none() {
            return reply.error(libc::ENOTDIR);
        }
        s.children_mut(parent).expect("a directory").remove(name);
        if let Some(old) = s
            .children_mut(newparent)
            .expect("a directory")
            .insert(newname.to_owned(), ino)
        {
            s.remove_tree(old);
        }
        if let Some(i) = s.inodes.get_mut(&ino) {
            i.parent = newparent;
        }
        reply.ok()
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.0.lock().inodes.get(&ino) {
            Some(_) => reply.opened(0, fuser::consts::FOPEN_DIRECT_IO),
            None => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let mut s = self.0.lock();
        match file_mut(&mut s, ino) {
            Ok((data, _, _)) => {
                let from = (offset.max(0) as usize).min(data.len());
                let to = (from + size as usize).min(data.len());
                reply.data(&data[from..to])
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        bytes: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut s = self.0.lock();
        if s.mode == Mode::Eio {
            return reply.error(libc::EIO);
        }
        match file_mut(&mut s, ino) {
            Ok((data, _, dirty_from)) => {
                let at = offset.max(0) as usize;
                if data.len() < at + bytes.len() {
                    data.resize(at + bytes.len(), 0);
                }
                data[at..at + bytes.len()].copy_from_slice(bytes);
                mark_dirty(dirty_from, at);
                reply.written(bytes.len() as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mode = self.0.lock().mode;
        match mode {
            Mode::Eio => return reply.error(libc::EIO),
            // The whole file system waits, as behind a stalled disk.
            Mode::SlowSync(d) => std::thread::sleep(d),
            Mode::Normal => {}
        }
        let mut s = self.0.lock();
        match file_mut(&mut s, ino) {
            Ok((data, synced, dirty_from)) => {
                sync_file(data, synced, dirty_from);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0)
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.0.lock();
        let Some(Inode {
            node: Node::Dir { children },
            parent,
            ..
        }) = s.inodes.get(&ino)
        else {
            return reply.error(libc::ENOTDIR);
        };
        let mut entries = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (*parent, FileType::Directory, OsString::from("..")),
        ];
        for (name, c) in children {
            let kind = match s.inodes.get(c).map(|i| &i.node) {
                Some(Node::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            entries.push((*c, kind, name.clone()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, (i + 1) as i64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.0.lock().mode {
            Mode::Eio => reply.error(libc::EIO),
            _ => reply.ok(),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let s = self.0.lock();
        let used: u64 = s
            .inodes
            .values()
            .map(|i| match &i.node {
                Node::File { data, .. } => (data.len() as u64).div_ceil(BLOCK as u64),
                Node::Dir { .. } => 1,
            })
            .sum();
        // 64 GiB, as far as RocksDB's space checks go.
        let blocks = (64u64 << 30) / BLOCK as u64;
        let free = blocks.saturating_sub(used);
        reply.statfs(blocks, free, free, 1 << 20, 1 << 20, BLOCK, 255, BLOCK)
    }
}

/// A mounted fault file system; unmounted when dropped.
pub struct FaultFs {
    state: Arc<Mutex<State>>,
    pub path: PathBuf,
    _session: fuser::BackgroundSession,
}

impl FaultFs {
    /// Mounts one at `at` (created if missing). `None`, with why on
    /// stderr, where FUSE is not available (no /dev/fuse, no fusermount3).
    pub fn mount(at: &Path) -> Option<FaultFs> {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("SKIPPED: no /dev/fuse on this machine: the fault file system needs FUSE");
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let mut inodes = BTreeMap::new();
        inodes.insert(
            ROOT,
            Inode {
                node: Node::Dir {
                    children: BTreeMap::new(),
                },
                perm: 0o755,
                mtime: SystemTime::now(),
                parent: ROOT,
            },
        );
        let state = Arc::new(Mutex::new(State {
            inodes,
            next_ino: ROOT + 1,
            mode: Mode::Normal,
            cuts: 0,
        }));
        let options = [
            MountOption::FSName("onecard-faultfs".into()),
            MountOption::AutoUnmount,
            MountOption::AllowOther,
        ];
        match fuser::spawn_mount2(Fs(state.clone()), at, &options) {
            Ok(session) => Some(FaultFs {
                state,
                path: at.to_owned(),
                _session: session,
            }),
            Err(e) => {
                eprintln!(
                    "SKIPPED: cannot mount the fault file system (FUSE; fusermount3 from Debian's fuse3): {e}"
                );
                None
            }
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().mode = mode;
    }

    /// The power goes: what was written and not synced is lost. Kill the
    /// process writing first (a cut stops it too).
    pub fn cut_power(&self) {
        self.state.lock().cut();
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        // The session's own unmount does not always happen here (its
        // thread may still hold the device); a lazy unmount always does.
        let _ = std::process::Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.path)
            .status();
    }
}
