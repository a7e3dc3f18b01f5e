// StoreFS — serves a BlockStore's files as ordinary files through libfuse3's low-level API, so
// QEMU, mkfs and cp use them directly: `/files/NAME` read-write, `/snapshots/NAME` read-only.
//
// Requests run on libfuse's own worker threads (`fuse_session_loop_mt`), never on Swift's
// cooperative pool, and call the store synchronously. Neighbours: BlockStore below; the VM
// engine above mounts it and invalidates the kernel's cache when it changes files behind it.
import BlockStore
import CFuse
import Foundation
import FurcateCore
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Tunables of a mount.
public struct MountOptions: Sendable {
    /// Let other users than the mounting one access the mount (`-o allow_other`).
    public var allowOther = false
    /// Largest read and write request (`max_read`, `max_write`), and the readahead.
    public var maxIO: UInt32 = 1 << 20
    /// Worker threads serving requests.
    public var threads: UInt32 = 8
    /// How long the kernel may cache names and attributes, in seconds. Long: only this process
    /// changes the files, and it invalidates the kernel's copy when it does so behind its back.
    public var cacheTimeout: Double = 3600
    /// Let the kernel buffer writes in its page cache and send them in large batches
    /// (FUSE_CAP_WRITEBACK_CACHE). Off by default until measured (docs/BENCHMARKS.md).
    public var writebackCache = false
    /// The mount's readahead in KiB (its bdi's `read_ahead_kb`). The kernel caps FUSE at
    /// 128 KiB unless told otherwise; nil leaves the kernel's value.
    public var readaheadKB: Int? = 1024
    /// The share of the system's dirty-page budget this mount may use, in percent (its bdi's
    /// `max_ratio`; the kernel gives a FUSE mount 1). Dirty pages here are mostly guest RAM
    /// written through MAP_SHARED. nil leaves the kernel's value.
    public var maxDirtyRatio: Int? = 20
    /// Where the server logs (label `furcate.fs`).
    public var logger = Logger(label: "furcate.fs")

    /// The defaults documented on each option.
    public init() {}
}

/// A FUSE server over one store.
public final class StoreFS: @unchecked Sendable {
    // SAFETY (@unchecked): `session` and `device` are set once in `run` before the signal thread
    // starts and `ready` is called, and read-only afterwards; everything else is immutable or
    // thread-safe (the store).
    /// The store served.
    public let store: BlockStore
    /// Where it is mounted.
    public let mountpoint: String
    let options: MountOptions
    var session: OpaquePointer?
    /// The mount's device ("MAJ:MIN"), read once it is live: after a lazy unmount it can no
    /// longer be looked up, and `abortConnection` needs it.
    var device: String?
    /// argv handed to libfuse, which keeps pointers into it for the session's life.
    private var argv: [UnsafeMutablePointer<CChar>?] = []

    /// The kernel's per-request limits of copy_file_range: FUSE caps a request at
    /// UINT_MAX & PAGE_MASK (its reply count is 32-bit), the VFS at MAX_RW_COUNT.
    static let copyRequestCaps: Set<Int> = [Int(UInt32.max) & ~4095, Int(Int32.max) & ~4095]

    static let rootIno: fuse_ino_t = 1
    static let filesIno: fuse_ino_t = 2
    static let snapshotsIno: fuse_ino_t = 3
    /// File inode = this + the file's row id (ids are never reused, so inodes are stable).
    static let fileInoBase: fuse_ino_t = 16

    var logger: Logger { options.logger }
    let uid = getuid()
    let gid = getgid()
    /// Directories show the time the server started.
    let started = timespec(tv_sec: time(nil), tv_nsec: 0)
    /// Open handles per file inode, and which of those files were unlinked while open.
    let handles = Mutex(OpenHandles())

    /// A server of `store` at `mountpoint`; nothing is mounted until it runs.
    public init(store: BlockStore, mountpoint: String, options: MountOptions = MountOptions()) {
        self.store = store
        self.mountpoint = mountpoint
        self.options = options
    }

    deinit {
        for a in argv { free(a) }
    }

    /// Mounts, serves requests until unmounted or signalled (SIGINT/SIGTERM/SIGHUP), then
    /// unmounts. Clears a stale mount left by a killed server first.
    /// - Parameter ready: called once the mount is live.
    /// - Throws: `.busy` when something live is mounted there, `.io` when mounting fails.
    public func run(ready: () -> Void = {}) throws {
        try Self.clearStaleMount(mountpoint)
        try removeOrphans()
        observeStore()
        var ops = makeOperations()
        var opts = "fsname=furcate,subtype=furcate,max_read=\(options.maxIO),default_permissions"
        if options.allowOther { opts += ",allow_other" }
        argv = ["furcate", "-o", opts].map { (s: String) -> UnsafeMutablePointer<CChar>? in strdup(s) }
        let se = argv.withUnsafeMutableBufferPointer { a in
            cfuse_session_new(Int32(a.count), a.baseAddress, &ops, Unmanaged.passUnretained(self).toOpaque())
        }
        guard let se else { throw FurcateError(.io, "cannot create the FUSE session (see libfuse's message above)") }
        session = se
        defer {
            fuse_session_destroy(se)
            session = nil
        }
        guard fuse_session_mount(se, mountpoint) == 0 else {
            throw FurcateError(
                .io, "cannot mount (is /dev/fuse there, and are you allowed to mount?)", path: mountpoint)
        }
        defer { fuse_session_unmount(se) }
        logger.info("mounted", metadata: ["fs.mountpoint": "\(mountpoint)", "store.dir": "\(store.directory)"])
        device = Self.deviceNumber(mountpoint)
        tuneBDI()
        startSignalThread()
        ready()
        let r = withExtendedLifetime(ops) { cfuse_session_loop_mt(se, options.threads) }
        logger.info("unmounting", metadata: ["fs.mountpoint": "\(mountpoint)", "fs.loop_result": "\(r)"])
        do { try store.syncAll() } catch {
            logger.error("sync at unmount failed", metadata: ["error": "\(error)"])
        }
    }

    /// The sysfs directory of the mount's backing device info (`/sys/class/bdi/MAJ:MIN`), found
    /// in /proc/self/mountinfo (the topmost mount at `mountpoint`). Stat-ing the mountpoint
    /// would do too, but from the serving process before its loop runs it would deadlock.
    public static func bdiPath(_ mountpoint: String) -> String? {
        deviceNumber(mountpoint).map { "/sys/class/bdi/\($0)" }
    }

    /// The device ("MAJ:MIN") of the topmost mount at `mountpoint`, from /proc/self/mountinfo.
    static func deviceNumber(_ mountpoint: String) -> String? {
        guard let real = realpath(mountpoint, nil) else { return nil }
        let target = String(cString: real)
        free(real)
        guard let info = readWholeFile("/proc/self/mountinfo") else { return nil }
        var dev: Substring?
        for line in info.split(separator: "\n") {
            // id parent MAJ:MIN root mountpoint options … (spaces in paths are written \040)
            let f = line.split(separator: " ")
            if f.count > 4, f[4].replacingOccurrences(of: "\\040", with: " ") == target { dev = f[2] }
        }
        return dev.map(String.init)
    }

    /// Unmounts `mountpoint`; with files still open, logs who holds them and detaches it lazily
    /// (they are served until closed). Returns those holders, nil after a clean unmount.
    @discardableResult
    static func unmountOrDetach(_ mountpoint: String, log: Logger) -> [String]? {
        guard umount2(mountpoint, 0) != 0 else { return nil }
        let holders = holders(of: mountpoint)
        log.warning(
            "files still open: unmounting lazily; they are served until closed",
            metadata: ["fs.mountpoint": "\(mountpoint)", "fs.holders": "\(holders.joined(separator: ", "))"])
        umount2(mountpoint, Int32(MNT_DETACH))
        return holders
    }

    /// The processes that have something in the mount open, mapped, or as their working or
    /// root directory, as "PID (COMMAND)". From /proc, which names a detached mount's files
    /// without the mountpoint: ask while it is still attached.
    public static func holders(of mountpoint: String) -> [String] {
        guard let real = realpath(mountpoint, nil) else { return [] }
        let root = String(cString: real)
        free(real)
        let inside = { (path: String) in path == root || path.hasPrefix(root + "/") }
        let fm = FileManager.default
        var found: [String] = []
        for pid in (try? fm.contentsOfDirectory(atPath: "/proc")) ?? [] where pid.allSatisfy(\.isNumber) {
            let dir = "/proc/" + pid
            var links = ["cwd", "root"].compactMap { try? fm.destinationOfSymbolicLink(atPath: dir + "/" + $0) }
            for fd in (try? fm.contentsOfDirectory(atPath: dir + "/fd")) ?? [] {
                if let l = try? fm.destinationOfSymbolicLink(atPath: dir + "/fd/" + fd) { links.append(l) }
            }
            let mapped =
                readWholeFile(dir + "/maps")?.split(separator: "\n").contains { line in
                    line.firstIndex(of: "/").map { inside(String(line[$0...])) } ?? false
                } ?? false
            guard mapped || links.contains(where: inside) else { continue }
            let comm = readWholeFile(dir + "/comm")?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
            found.append("\(pid) (\(comm))")
        }
        return found
    }

    /// Ends the FUSE connection through the kernel's fusectl `abort`: whatever waits on the
    /// mount fails with an error and the server's loop returns. The last resort when files stay
    /// open past a deadline. Mounts fusectl if it is not (root). False when it cannot.
    func abortConnection() -> Bool {
        let control = "/sys/fs/fuse/connections"
        guard let device, let colon = device.firstIndex(of: ":"),
            let major = UInt32(device[..<colon]), let minor = UInt32(device[device.index(after: colon)...])
        else { return false }
        // The kernel names a connection by its dev_t, major << 20 | minor.
        let abort = "\(control)/\((major << 20) | minor)/abort"
        if access(abort, F_OK) != 0 { Glibc.mount("fusectl", control, "fusectl", 0, nil) }
        let fd = open(abort, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return write(fd, "1", 1) == 1
    }

    /// Applies `readaheadKB` and `maxDirtyRatio`. Best effort: writing sysfs needs root, and a
    /// mount without it still works, only slower; a failure is logged, not thrown.
    private func tuneBDI() {
        guard let bdi = Self.bdiPath(mountpoint) else { return }
        for (key, value) in [("read_ahead_kb", options.readaheadKB), ("max_ratio", options.maxDirtyRatio)] {
            guard let value else { continue }
            do {
                try "\(value)\n".write(toFile: "\(bdi)/\(key)", atomically: false, encoding: .utf8)
            } catch {
                logger.warning(
                    "cannot tune the mount (needs root); it works with the kernel's defaults",
                    metadata: ["fs.bdi": "\(bdi)/\(key)", "fs.value": "\(value)", "error": "\(error)"])
            }
        }
    }

    static let terminationSignals = [SIGINT, SIGTERM, SIGHUP]

    /// Blocks SIGINT/SIGTERM/SIGHUP in the calling thread and every thread it starts later, so
    /// they reach only the thread `run` dedicates to them. Call it first thing in a process that
    /// will mount: a signal delivered to any other thread would kill it without unmounting.
    /// (libfuse's own handlers only work when the signal lands on one of its threads.)
    public static func blockTerminationSignals() {
        var set = sigset_t()
        sigemptyset(&set)
        for s in terminationSignals { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Waits for a termination signal on a dedicated thread, then unmounts: the kernel ends the
    /// connection, libfuse's workers see it and the session loop returns. With files still open
    /// the unmount is lazy, they are served until closed, and their holders are logged; a second
    /// signal aborts the connection (they get errors) so the server syncs and ends at once.
    private func startSignalThread() {
        let mp = mountpoint
        let log = logger
        Thread.detachNewThread { [weak self] in
            var set = sigset_t()
            sigemptyset(&set)
            for s in StoreFS.terminationSignals { sigaddset(&set, s) }
            var sig: Int32 = 0
            guard sigwait(&set, &sig) == 0 else { return }
            log.info("signal: unmounting", metadata: ["fs.signal": "\(sig)", "fs.mountpoint": "\(mp)"])
            if Self.unmountOrDetach(mp, log: log) != nil {
                // Served until closed, or until a second signal.
                guard sigwait(&set, &sig) == 0 else { return }
                let aborted = self?.abortConnection() ?? false
                log.warning(
                    aborted
                        ? "second signal: FUSE connection aborted"
                        : "second signal: cannot abort the FUSE connection (fusectl)",
                    metadata: ["fs.signal": "\(sig)", "fs.mountpoint": "\(mp)"])
            }
        }
    }

    /// Detects a mount whose server died ("Transport endpoint is not connected") and detaches it.
    /// - Throws: `.busy` when a live filesystem is already mounted at `path`.
    public static func clearStaleMount(_ path: String) throws {
        // statvfs, unlike stat, is never answered from the kernel's attribute cache, so it
        // reaches a dead server and fails.
        var sfs = statvfs()
        if statvfs(path, &sfs) == 0 {
            if isMountPoint(path) {
                throw FurcateError(.busy, "something is already mounted here", path: path)
            }
            return
        }
        let e = errno
        guard e == ENOTCONN || e == ECONNABORTED else {
            throw FurcateError.system("stat", errno: e, path: path)
        }
        if umount2(path, Int32(MNT_DETACH)) != 0 {
            throw FurcateError.system("umount2 (clearing a stale mount)", errno: errno, path: path)
        }
    }

    /// True when `path` is a mount point (its device differs from its parent's).
    public static func isMountPoint(_ path: String) -> Bool {
        var a = stat()
        var b = stat()
        guard stat(path, &a) == 0, stat(path + "/..", &b) == 0 else { return false }
        return a.st_dev != b.st_dev || a.st_ino == b.st_ino
    }

    /// Keeps the kernel's caches true to changes made through the store API while mounted (a
    /// restore or clone by the VM engine in this process): contents replaced → cached pages and
    /// attributes dropped; a name created, renamed or deleted → its cached entry dropped.
    /// Changes made by FUSE requests themselves are skipped: they came through the kernel, which
    /// updated its caches, and invalidating from inside a request can deadlock.
    ///
    /// A file whose contents are replaced must not have dirty pages in the kernel (e.g. a guest's
    /// RAM mapped by a running QEMU): the kernel would write them back over the new contents.
    /// The VM engine replaces only files no process has open.
    private func observeStore() {
        store.observeChanges { [weak self] change in
            guard let self, !Self.isWorkerThread else { return }
            self.invalidate(change)
        }
    }

    /// A thread-local flag set on libfuse's worker threads (at each request: one
    /// pthread_setspecific). Store changes made there came through the kernel.
    private static let workerKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    static func markWorkerThread() {
        // SAFETY: the value is only compared with nil; it points at nothing.
        if pthread_getspecific(workerKey) == nil { pthread_setspecific(workerKey, UnsafeRawPointer(bitPattern: 1)) }
    }

    static var isWorkerThread: Bool { pthread_getspecific(workerKey) != nil }

    /// Tells the kernel about `change`. Not an error when it had nothing cached.
    public func invalidate(_ change: StoreChange) {
        guard let se = session else { return }
        switch change {
        case .contents(let id):
            _ = fuse_lowlevel_notify_inval_inode(se, Self.fileInoBase + fuse_ino_t(id), 0, 0)
        case .named(let name, let kind), .removed(let name, let kind):
            let parent = kind == .snapshot ? Self.snapshotsIno : Self.filesIno
            _ = fuse_lowlevel_notify_inval_entry(se, parent, name, name.utf8.count)
        }
    }

    // MARK: unlink while open

    /// Names of files unlinked while open start with this; they are invisible through the
    /// mount, cannot be created through it, and are deleted on last close or at the next mount.
    static let orphanPrefix = ".furcate-unlinked-"

    static func isReservedName(_ n: String) -> Bool { n.hasPrefix(orphanPrefix) }

    /// Deletes files a previous server left unlinked-but-open when it stopped.
    func removeOrphans() throws {
        for info in try store.list() where Self.isReservedName(info.name) {
            try store.delete(info.name)
            logger.info("removed a file unlinked while open", metadata: ["store.file": "\(info.name)"])
        }
    }

    /// Unlinks `f`: deleted now when no handle is open; otherwise renamed out of sight and
    /// deleted when its last handle closes, as a local filesystem keeps an open unlinked file.
    func unlink(_ f: StoreFile) throws {
        let ino = fileIno(f)
        let keep = handles.withLock { h -> Bool in
            guard h.count[ino, default: 0] > 0 else { return false }
            h.orphans.insert(ino)
            return true
        }
        if keep {
            try store.rename(f.name, to: Self.orphanPrefix + "\(f.id)")
        } else {
            try store.delete(f.name)
        }
    }

    func opened(_ ino: fuse_ino_t) { handles.withLock { $0.count[ino, default: 0] += 1 } }

    /// A handle was closed; the last one of an unlinked file deletes it.
    func released(_ ino: fuse_ino_t) {
        let orphan = handles.withLock { h -> Bool in
            let n = h.count[ino, default: 1] - 1
            h.count[ino] = n > 0 ? n : nil
            return n <= 0 && h.orphans.remove(ino) != nil
        }
        guard orphan, let f = try? file(ino) else { return }
        do { try store.delete(f.name) } catch {
            logger.error(
                "cannot delete a closed unlinked file", metadata: ["store.file": "\(f.name)", "error": "\(error)"])
        }
    }

    // MARK: helpers used by the operations

    func fileIno(_ f: StoreFile) -> fuse_ino_t { Self.fileInoBase + fuse_ino_t(f.id) }

    func file(_ ino: fuse_ino_t) throws -> StoreFile {
        guard ino >= Self.fileInoBase else { throw FurcateError(.invalidArgument, "not a file") }
        return try store.file(id: Int64(ino - Self.fileInoBase))
    }

    func attr(_ ino: fuse_ino_t) throws -> stat {
        var st = stat()
        st.st_ino = UInt(ino)
        st.st_uid = uid
        st.st_gid = gid
        switch ino {
        case Self.rootIno, Self.filesIno, Self.snapshotsIno:
            st.st_mode = S_IFDIR | 0o755
            st.st_nlink = 2
            st.st_size = 4096
            st.st_mtim = started
            st.st_ctim = started
            st.st_atim = started
        default:
            let f = try file(ino)
            st.st_mode = S_IFREG | (f.isSnapshot ? 0o444 : 0o644)
            st.st_nlink = Self.isReservedName(f.name) ? 0 : 1
            st.st_size = off_t(f.size)
            st.st_blksize = Int(f.blockSize)
            st.st_blocks = (off_t(f.size) + 511) / 512
            let t = f.modificationTime
            let ts = timespec(tv_sec: Int(t), tv_nsec: Int((t - t.rounded(.down)) * 1e9))
            st.st_mtim = ts
            st.st_ctim = ts
            st.st_atim = ts
        }
        return st
    }

    /// Which directory a file of `kind` lives in.
    static func directory(of f: StoreFile) -> fuse_ino_t { f.isSnapshot ? snapshotsIno : filesIno }
}

/// Open handles per file inode, and the inodes unlinked while open.
struct OpenHandles {
    var count: [fuse_ino_t: Int] = [:]
    var orphans: Set<fuse_ino_t> = []
}

extension StoreFS {
    /// Mounts on a dedicated thread and returns once the mount is live (what `furcate serve`,
    /// the VM tests and `furcate bench fork` do: the VM engine and the mount share one store).
    /// - Throws: what `run` throws when mounting fails.
    public func startInBackground() throws -> BackgroundMount {
        let m = BackgroundMount(self)
        try m.start()
        return m
    }
}

/// A StoreFS served on its own thread; `stop()` unmounts and waits for the server to finish.
public final class BackgroundMount: Sendable {
    /// The server, mounted on its own thread.
    public let fs: StoreFS
    private let ready = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    private let failure = Mutex<(any Error)?>(nil)
    private let stopped = Mutex(false)

    init(_ fs: StoreFS) { self.fs = fs }

    func start() throws {
        Thread.detachNewThread { [self] in
            do { try fs.run { ready.signal() } } catch {
                failure.withLock { $0 = error }
                ready.signal()
            }
            finished.signal()
        }
        ready.wait()
        if let e = failure.withLock({ $0 }) {
            finished.wait()
            throw e
        }
    }

    /// How a `stop` went.
    public struct Stopped: Sendable {
        /// The processes that still had files of the mount open when it was unmounted
        /// ("PID (COMMAND)"); the unmount was lazy then. Empty after a clean unmount.
        public var holders: [String] = []
        /// Files were still open when the grace ran out.
        public var graceExpired = false
        /// …and the connection was aborted then (false: fusectl was not usable, and the server
        /// was left to end when they close).
        public var aborted = false
    }

    /// How long `stop` serves files still open before aborting the connection.
    public static let defaultGrace: Duration = .seconds(30)

    /// Unmounts and waits until the server has synced and returned. With files still open the
    /// unmount is lazy and they are served until closed — for up to `grace`: then the connection
    /// is aborted (their holders get errors), so that a leaked descriptor cannot keep a process
    /// from ending. Idempotent.
    @discardableResult
    public func stop(grace: Duration = defaultGrace) -> Stopped {
        guard
            !stopped.withLock({ s in
                defer { s = true }; return s
            })
        else { return Stopped() }
        var result = Stopped()
        let log = fs.logger
        result.holders = StoreFS.unmountOrDetach(fs.mountpoint, log: log) ?? []
        let (secs, atto) = grace.components
        if finished.wait(timeout: .now() + .nanoseconds(Int(secs) * 1_000_000_000 + Int(atto / 1_000_000_000)))
            == .timedOut
        {
            result.graceExpired = true
            result.aborted = fs.abortConnection()
            log.error(
                result.aborted
                    ? "files still open after the grace: FUSE connection aborted"
                    : "files still open after the grace, and the FUSE connection cannot be aborted (fusectl); not waiting for them",
                metadata: [
                    "fs.mountpoint": "\(fs.mountpoint)", "fs.grace": "\(grace)",
                    "fs.holders": "\(result.holders.joined(separator: ", "))",
                ])
            if result.aborted { finished.wait() }
        }
        return result
    }
}
