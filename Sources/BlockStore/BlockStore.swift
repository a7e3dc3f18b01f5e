// BlockStore — Furcate's content-addressed copy-on-write store.
//
// Fixed-size blocks named by their SHA-256 are stored once, compressed, in append-only pack
// files; a SQLite index says where each block lives. A file is a persistent radix tree of
// block ids (`BlockTree`): clone and snapshot copy a root, never data. Neighbours: StoreFS
// (above) serves these files to the kernel through FUSE and calls in from its own threads;
// nothing here knows of FUSE, QEMU or HTTP. See docs/ARCHITECTURE.md for the on-disk format.
import Foundation
import FurcateCore
import GRDB
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Tunables of an open store.
public struct StoreOptions: Sendable {
    /// Bytes of decompressed blocks kept in memory, shared by all files.
    public var blockCacheBytes = 256 << 20
    /// Bytes of decoded tree nodes kept in memory.
    public var nodeCacheBytes = 64 << 20
    /// Unsynced written bytes held in memory before they are hashed and appended to packs.
    public var dirtyBudgetBytes = 128 << 20
    /// A sealed pack whose live fraction falls below this is compacted by GC.
    public var compactionThreshold = 0.5
    /// Size at which the active pack is sealed and a new one started.
    public var packRolloverBytes: UInt64 = 256 << 20
    /// Verify the SHA-256 of every block read from a pack, not only its CRC (fsck always does).
    public var verifyHashOnRead = false
    /// Where the store logs (label `furcate.store`).
    public var logger = Logger(label: "furcate.store")

    /// The defaults documented on each option.
    public init() {}
}

/// What `furcate store ls` lists.
public struct FileInfo: Sendable, Codable, Equatable {
    /// The file's name, unique among files and snapshots.
    public var name: String
    /// File or snapshot.
    public var kind: FileKind
    /// Its size in bytes.
    public var size: UInt64
    /// Its block size, a power of two from 4 KiB to 1 MiB.
    public var blockSize: Int
    /// The codec new blocks are stored with (as `--codec` takes it).
    public var codec: String
    /// When it was created, Unix seconds.
    public var createdAt: Double
    /// When its contents last changed (at a sync), Unix seconds.
    public var modifiedAt: Double
}

/// A content-addressed copy-on-write block store in one directory.
///
/// Thread-safe and synchronous: its callers include FUSE worker threads, which must not hop
/// onto Swift's cooperative pool, so it guards state with locks rather than being an actor.
/// Only one process opens a store at a time (an exclusive `flock`); a second gets `.busy`.
public final class BlockStore: Sendable {
    /// Smallest and largest block sizes a file may have.
    public static let blockSizeRange = 4096...(1 << 20)
    /// The block size of files created without one: 64 KiB.
    public static let defaultBlockSize = 64 << 10

    /// The store's directory (lock, index, packs).
    public let directory: String
    /// What the store was opened with.
    public let options: StoreOptions
    /// Block size given to files created without one.
    public let defaultBlockSize: Int
    /// Codec given to files created without one.
    public let defaultCodec: Codec

    let index: StoreIndex
    let packs: PackSet
    let blockCache: LRUCache<[UInt8]>
    let nodeCache: LRUCache<TreeNode>
    let registry = PendingRegistry()
    /// Held shared while a writer checks whether a block exists; held exclusively while GC
    /// decides what to delete, so a block found by a writer is never swept under it.
    let gcGate = RWLock()
    let gcMutex = Mutex(())
    let dirtyBytes = Atomic<Int>(0)
    let lockFD: Int32
    private let files = Mutex(OpenFiles())
    /// Serializes namespace changes (create, clone, rename, delete) with the in-memory table.
    let namespace = Mutex(())
    let closed = Atomic<Bool>(false)
    private let observers = Mutex<[@Sendable (StoreChange) -> Void]>([])

    var logger: Logger { options.logger }

    // MARK: create / open

    /// Creates an empty store in `directory` (created if missing; it must be empty).
    /// - Throws: `.exists` when a store is there already, `.invalidArgument` for a bad block
    ///   size, `.io` when the directory cannot be made.
    @discardableResult
    public static func create(
        at directory: String, blockSize: Int = defaultBlockSize, codec: Codec = .default,
        options: StoreOptions = StoreOptions()
    ) throws -> BlockStore {
        try validateBlockSize(blockSize)
        let fm = FileManager.default
        if fm.fileExists(atPath: directory + "/index.sqlite") {
            throw FurcateError(.exists, "a store exists already", path: directory)
        }
        var isDir: ObjCBool = false
        if fm.fileExists(atPath: directory, isDirectory: &isDir) {
            guard isDir.boolValue else { throw FurcateError(.invalidArgument, "not a directory", path: directory) }
            let entries = (try? fm.contentsOfDirectory(atPath: directory)) ?? []
            guard entries.isEmpty else {
                throw FurcateError(
                    .exists, "directory is not empty; a new store needs an empty directory", path: directory)
            }
        }
        do {
            try fm.createDirectory(atPath: directory + "/packs", withIntermediateDirectories: true)
        } catch {
            throw FurcateError(
                .io, "cannot create store directory", path: directory, underlying: UnderlyingMessage(error))
        }
        let store = try BlockStore(directory: directory, creating: true, options: options)
        try store.index.write("init") { db in
            try store.index.setMeta(db, "block_size", "\(blockSize)")
            try store.index.setMeta(db, "codec", codec.description)
        }
        store.close()
        return try open(at: directory, options: options)
    }

    /// Opens an existing store.
    /// - Throws: `.notAStore` when `directory` holds none, `.busy` when another process has it
    ///   open, `.unsupportedFormat` for a newer format.
    public static func open(at directory: String, options: StoreOptions = StoreOptions()) throws -> BlockStore {
        try BlockStore(directory: directory, creating: false, options: options)
    }

    /// Checks a block size.
    /// - Throws: `.invalidArgument` unless it is a power of two from 4 KiB to 1 MiB.
    public static func validateBlockSize(_ size: Int) throws {
        guard blockSizeRange.contains(size), size & (size - 1) == 0 else {
            throw FurcateError(.invalidArgument, "block size \(size) is not a power of two from 4 KiB to 1 MiB")
        }
    }

    private init(directory: String, creating: Bool, options: StoreOptions) throws {
        let dir = directory.count > 1 && directory.hasSuffix("/") ? String(directory.dropLast()) : directory
        self.directory = dir
        self.options = options
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDir), isDir.boolValue else {
            throw FurcateError(.notAStore, "no store here (run 'furcate store init' first)", path: dir)
        }
        if !creating && !FileManager.default.fileExists(atPath: dir + "/index.sqlite") {
            throw FurcateError(
                .notAStore, "not a Furcate store (no index.sqlite; run 'furcate store init' first)", path: dir)
        }
        // One writer process: an exclusive, non-blocking flock on DIR/lock, released by the
        // kernel when the process dies however it dies, so a kill -9 never leaves it stuck.
        let lockPath = dir + "/lock"
        let fd = try syscall("open", path: lockPath) { Glibc.open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644) }
        // Our own pid in the lock file means a child forked by another thread of this process
        // (before its exec closed the descriptor) still holds the lock of a store we closed a
        // moment ago: that lasts microseconds to milliseconds, so wait for it.
        var ownWaits = 0
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            var holder = ""
            var holderPID: Int?
            if let text = try? String(contentsOfFile: lockPath, encoding: .utf8),
                let pid = Int(text.trimmingCharacters(in: .whitespacesAndNewlines))
            {
                holder = " by process \(pid)"
                holderPID = pid
            }
            if e == EWOULDBLOCK && holderPID == Int(getpid()) && ownWaits < 500 {
                ownWaits += 1
                usleep(10_000)
                continue
            }
            Glibc.close(fd)
            if e == EWOULDBLOCK {
                throw FurcateError(.busy, "store is in use\(holder); only one process may open it", path: dir)
            }
            throw FurcateError.system("flock", errno: e, path: lockPath)
        }
        ftruncate(fd, 0)
        let pid = "\(getpid())\n"
        _ = pid.withCString { pwrite(fd, $0, strlen($0), 0) }
        lockFD = fd
        do {
            try? FileManager.default.createDirectory(atPath: dir + "/packs", withIntermediateDirectories: true)
            let idx = try StoreIndex(path: dir + "/index.sqlite", create: creating)
            index = idx
            let (version, bs, codec) = try idx.read("read meta") { db in
                (try idx.meta(db, "format_version"), try idx.meta(db, "block_size"), try idx.meta(db, "codec"))
            }
            guard version == "\(StoreIndex.formatVersion)" else {
                throw FurcateError(
                    .unsupportedFormat,
                    "store format version \(version ?? "?") is not supported (this build reads \(StoreIndex.formatVersion))",
                    path: dir)
            }
            defaultBlockSize = bs.flatMap(Int.init) ?? Self.defaultBlockSize
            defaultCodec = (try? codec.map(Codec.init(parsing:)) ?? .default) ?? .default
            let packDir = dir + "/packs"
            let probe = PackSet(directory: packDir, nextID: 1)
            let maxOnDisk = probe.packIDsOnDisk().last ?? 0
            let maxIndexed = try idx.read("read packs") { db in
                try Int64.fetchOne(db, sql: "SELECT MAX(pack) FROM blocks") ?? 0
            }
            // A crash between creating a pack and writing its header leaves a file shorter than a
            // header that no block refers to: it holds nothing, so it goes (fsck would call it
            // damage). Its id is not reused (nextID below counts it).
            for id in probe.packIDsOnDisk() where id > maxIndexed {
                var st = stat()
                let p = probe.path(of: id)
                if stat(p, &st) == 0, st.st_size < PackFormat.headerSize {
                    unlink(p)
                    options.logger.warning(
                        "removed a pack torn at its creation",
                        metadata: ["store.pack": "\(p)", "bytes": "\(st.st_size)"])
                }
            }
            // A new pack per session: never append after a torn tail a crash may have left.
            packs = PackSet(
                directory: packDir, nextID: max(maxOnDisk, maxIndexed) + 1, rolloverSize: options.packRolloverBytes)
            blockCache = LRUCache(capacity: options.blockCacheBytes)
            nodeCache = LRUCache(capacity: options.nodeCacheBytes)
        } catch {
            Glibc.close(fd)
            throw error
        }
    }

    /// Makes every file's writes durable and releases the store. Idempotent; not an error
    /// when a sync fails (the failure is logged and unsynced writes are lost as in a crash).
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for f in files.withLock({ Array($0.byName.values) }) {
            do { try f.sync(in: self) } catch {
                logger.error("close: sync failed", metadata: ["store.file": "\(f.name)", "error": "\(error)"])
            }
        }
        try? index.pool.close()
        Glibc.close(lockFD)
    }

    deinit { close() }

    func checkOpen() throws {
        if closed.load(ordering: .acquiring) {
            throw FurcateError(.invalidArgument, "store is closed", path: directory)
        }
    }

    // MARK: change notification

    /// Calls `observer` after every namespace change and every O(1) content replacement (a FUSE
    /// server drops the kernel's cached copy). Writes through `StoreFile` are not reported.
    /// The observer runs on the changing thread with no store lock held.
    public func observeChanges(_ observer: @escaping @Sendable (StoreChange) -> Void) {
        observers.withLock { $0.append(observer) }
    }

    private func notify(_ change: StoreChange) {
        for o in observers.withLock({ $0 }) { o(change) }
    }

    // MARK: namespace

    /// Creates an empty file.
    /// - Throws: `.exists`, `.invalidArgument` (bad name or block size).
    @discardableResult
    public func createFile(_ name: String, blockSize: Int? = nil, codec: Codec? = nil) throws -> StoreFile {
        try checkOpen()
        try EntityName.validate(name, what: "file name")
        let bs = blockSize ?? defaultBlockSize
        try Self.validateBlockSize(bs)
        let f = try namespace.withLock { _ in
            let id = try index.write("create \(name)") { db in
                try index.insertFile(
                    db, name: name, kind: .file, root: .hole, size: 0, blockSize: bs, codec: codec ?? defaultCodec)
            }
            let row = FileRow(
                id: id, name: name, kind: .file, root: .hole, size: 0, blockSize: bs, codec: codec ?? defaultCodec,
                createdAt: Date().timeIntervalSince1970, modifiedAt: Date().timeIntervalSince1970, generation: 0)
            let f = StoreFile(store: self, row: row)
            files.withLock { $0.add(f, as: name) }
            return f
        }
        notify(.named(name, kind: .file))
        return f
    }

    /// The file or snapshot called `name`.
    /// - Throws: `.notFound`.
    public func file(_ name: String) throws -> StoreFile {
        try checkOpen()
        if let f = files.withLock({ $0.byName[name] }) { return f }
        try EntityName.validate(name)
        return try namespace.withLock { _ in
            if let f = files.withLock({ $0.byName[name] }) { return f }
            guard let row = try index.read("look up \(name)", { db in try index.file(db, named: name) }) else {
                throw FurcateError(.notFound, "no file or snapshot named '\(name)'", path: directory)
            }
            let f = StoreFile(store: self, row: row)
            files.withLock { $0.add(f, as: name) }
            return f
        }
    }

    /// The file or snapshot whose row id is `id` (its inode number, stable across renames).
    /// - Throws: `.notFound`.
    public func file(id: Int64) throws -> StoreFile {
        try checkOpen()
        if let f = files.withLock({ $0.byID[id] }) { return f }  // every FUSE request: O(1)
        guard
            let name = try index.read(
                "look up file \(id)",
                { db in
                    try String.fetchOne(db, sql: "SELECT name FROM files WHERE id = ?", arguments: [id])
                })
        else {
            throw FurcateError(.notFound, "no file or snapshot with id \(id)", path: directory)
        }
        return try file(name)
    }

    /// O(1): makes `dst` (a file) hold `src`'s current contents, dropping its own unsynced
    /// writes (`cp` through the mount, restore of a VM disk). Durable on return.
    /// - Throws: `.notPermitted` when `dst` is a snapshot.
    public func replaceContents(of dst: StoreFile, with src: StoreFile) throws {
        try checkOpen()
        guard dst.kind == .file else {
            throw FurcateError(.notPermitted, "'\(dst.name)' is a snapshot and cannot be changed")
        }
        // A tree's block ids mean blocks of its file's size: another size would read garbage.
        guard dst.blockSize == src.blockSize else {
            throw FurcateError(
                .invalidArgument,
                "'\(dst.name)' has \(dst.blockSize)-byte blocks and '\(src.name)' \(src.blockSize)-byte ones: contents move only between files of one block size"
            )
        }
        try namespace.withLock { _ in
            let (root, size) = try src.committedState()
            try dst.replace(root: root, size: size)
        }
        notify(.contents(fileID: dst.id))
    }

    /// True when a file or snapshot called `name` exists.
    public func exists(_ name: String) throws -> Bool {
        if files.withLock({ $0.byName[name] }) != nil { return true }
        return try index.read("look up \(name)") { db in try index.file(db, named: name) } != nil
    }

    /// Every file and snapshot, by name, with sizes as last synced or written.
    public func list() throws -> [FileInfo] {
        try checkOpen()
        let rows = try index.read("list") { db in try index.files(db) }
        let open = files.withLock { $0.byName }
        return rows.map { r in
            let size = open[r.name]?.size ?? r.size
            return FileInfo(
                name: r.name, kind: r.kind, size: size, blockSize: r.blockSize, codec: r.codec.description,
                createdAt: r.createdAt, modifiedAt: r.modifiedAt)
        }
    }

    /// O(1) copy-on-write clone: `dst` becomes a new file with `src`'s current contents.
    /// `src` (a file or a snapshot) is synced first, so pending writes are part of the clone.
    /// - Throws: `.notFound` (src), `.exists` (dst), `.invalidArgument` (bad name).
    @discardableResult
    public func clone(_ src: String, to dst: String) throws -> StoreFile {
        try derive(src, dst, kind: .file)
    }

    /// An immutable snapshot of `name` called `snapshotName`, O(1) like `clone`.
    @discardableResult
    public func snapshot(_ name: String, as snapshotName: String) throws -> StoreFile {
        try derive(name, snapshotName, kind: .snapshot)
    }

    private func derive(_ src: String, _ dst: String, kind: FileKind) throws -> StoreFile {
        try checkOpen()
        try EntityName.validate(dst, what: "\(kind.name) name")
        let source = try file(src)
        let f = try namespace.withLock { _ in
            // Under the namespace lock the source cannot be deleted (and its root swept by GC)
            // before the new row names the root; the sync and capture hold the source's write
            // lock so no write slips between.
            let (root, size) = try source.committedState()
            let id = try index.write("\(kind.name) \(src) -> \(dst)") { db in
                try index.insertFile(
                    db, name: dst, kind: kind, root: root, size: size, blockSize: source.blockSize, codec: source.codec)
            }
            let now = Date().timeIntervalSince1970
            let row = FileRow(
                id: id, name: dst, kind: kind, root: root, size: size, blockSize: source.blockSize, codec: source.codec,
                createdAt: now, modifiedAt: now, generation: 0)
            let f = StoreFile(store: self, row: row)
            files.withLock { $0.add(f, as: dst) }
            return f
        }
        notify(.named(dst, kind: kind))
        return f
    }

    /// Deletes a file or snapshot. Its blocks are freed by the next GC unless shared.
    /// - Throws: `.notFound`.
    public func delete(_ name: String) throws {
        try checkOpen()
        let kind = try namespace.withLock { _ -> FileKind in
            let open = files.withLock { $0.byName[name] }
            let kind = try index.write("delete \(name)") { db -> FileKind? in
                let k = try index.file(db, named: name)?.kind
                try db.execute(sql: "DELETE FROM files WHERE name = ?", arguments: [name])
                return k
            }
            guard let kind else {
                throw FurcateError(.notFound, "no file or snapshot named '\(name)'", path: directory)
            }
            _ = files.withLock { $0.remove(name) }
            open?.discard()
            return kind
        }
        notify(.removed(name, kind: kind))
    }

    /// Renames a file or snapshot.
    /// - Throws: `.notFound` (from), `.exists` (to), `.invalidArgument` (bad name).
    public func rename(_ from: String, to: String) throws {
        try checkOpen()
        try EntityName.validate(to)
        let kind = try namespace.withLock { _ -> FileKind in
            let kind = try index.write("rename \(from) -> \(to)") { db -> FileKind in
                if try index.file(db, named: to) != nil { throw FurcateError(.exists, "'\(to)' exists already") }
                guard let k = try index.file(db, named: from)?.kind else {
                    throw FurcateError(.notFound, "no file or snapshot named '\(from)'")
                }
                try db.execute(sql: "UPDATE files SET name = ? WHERE name = ?", arguments: [to, from])
                return k
            }
            files.withLock { t in
                if let f = t.remove(from) {
                    f.renamed(to)
                    t.add(f, as: to)
                }
            }
            return kind
        }
        notify(.removed(from, kind: kind))
        notify(.named(to, kind: kind))
    }

    /// Syncs every file with unsynced writes.
    public func syncAll() throws {
        for f in files.withLock({ Array($0.byName.values) }) { try f.sync() }
    }

    // MARK: blocks

    /// Loads a tree node, checking its hash and encoding.
    func loadNode(_ id: BlockID) throws -> TreeNode {
        if let n = nodeCache.get(id) { return n }
        guard let data = try index.read("load node", { db in try index.nodeData(db, id) }) else {
            throw FurcateError(.damaged, "tree node \(id) is missing from the index", path: index.path)
        }
        let node = try data.withUnsafeBytes { raw -> TreeNode in
            guard BlockID.hash(raw) == id, let n = TreeNode.decode(raw) else {
                throw FurcateError(.damaged, "tree node \(id) fails its hash check", path: index.path)
            }
            return n
        }
        nodeCache.put(id, node, cost: 8 << 10)
        return node
    }

    /// A tree reader over this store's nodes. Holds the store strongly: it is a short-lived value,
    /// and `close()` runs it from `deinit`, where an unowned reference could no longer be read.
    var tree: BlockTree { BlockTree(load: { try self.loadNode($0) }) }

    /// Where block `id` is: a pending (unindexed) location first, then the index.
    func locate(_ id: BlockID) throws -> BlockLocation? {
        if let l = registry.location(id) { return l }
        return try index.read("locate block") { db in try index.location(db, id) }
    }

    /// The bytes of block `id` (`size` bytes), shared with the block cache: a hit copies nothing.
    /// - Throws: `.damaged` naming `file` and `fileOffset` (and logs it) when the block is
    ///   missing, quarantined or fails a check.
    func blockData(_ id: BlockID, size: Int, file: String, fileOffset: UInt64) throws -> [UInt8] {
        if let cached = blockCache.get(id), cached.count == size { return cached }
        let data = try [UInt8](unsafeUninitializedCapacity: size) { buf, n in
            try readBlockUncached(id, into: UnsafeMutableRawBufferPointer(buf), file: file, fileOffset: fileOffset)
            n = size
        }
        blockCache.put(id, data, cost: size)
        return data
    }

    /// Reads block `id` (exactly `dst.count` bytes) from its pack into `dst`, bypassing the cache.
    private func readBlockUncached(
        _ id: BlockID, into dst: UnsafeMutableRawBufferPointer, file: String, fileOffset: UInt64
    ) throws {
        do {
            var attempt = 0
            while true {
                guard let loc = try locate(id) else {
                    let q = try index.read("check quarantine") { db in
                        try Bool.fetchOne(db, sql: "SELECT 1 FROM quarantine WHERE id = ?", arguments: [Data(id.bytes)])
                            ?? false
                    }
                    throw FurcateError(
                        .damaged, q ? "block \(id) is quarantined (damaged)" : "block \(id) is missing from the index")
                }
                let h: PackHandle
                do {
                    h = try packs.handle(loc.pack)
                } catch let e as FurcateError where e.code == .notFound && attempt == 0 {
                    attempt += 1  // compacted away between the lookup and the open: look again
                    continue
                }
                let claimed = try h.readBlock(loc, into: dst)
                guard claimed == id else {
                    throw FurcateError(
                        .damaged, "pack record holds block \(claimed), index expected \(id)", path: h.path,
                        offset: loc.offset)
                }
                if options.verifyHashOnRead, BlockID.hash(UnsafeRawBufferPointer(dst)) != id {
                    throw FurcateError(.damaged, "block \(id) fails its hash check", path: h.path, offset: loc.offset)
                }
                break
            }
        } catch let e as FurcateError {
            guard e.code == .damaged else { throw e }
            logger.error(
                "damaged block",
                metadata: [
                    "store.file": "\(file)", "store.offset": "\(fileOffset)", "block.id": "\(id.hex)",
                    "pack.path": "\(e.path ?? "-")", "pack.offset": "\(e.offset.map(String.init) ?? "-")",
                    "reason": "\(e.message)",
                ])
            throw FurcateError(
                .damaged, "damaged block in '\(file)' at offset \(fileOffset): \(e.message)", path: file,
                offset: fileOffset,
                operation: "read", underlying: e)
        }
    }

    /// Makes sure block `id` with contents `data` is stored, and takes a pending reference on it
    /// (released by `releasePending` once a commit indexed it or the entry was overwritten).
    func storePending(_ id: BlockID, _ data: UnsafeRawBufferPointer, codec: Codec) throws {
        try gcGate.withReadLock {
            if registry.retainIfPresent(id) { return }
            if try index.read("dedup lookup", { db in try index.location(db, id) }) != nil {
                registry.retain(id, location: nil)
                return
            }
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: Codec.bound(data.count), alignment: 16)
            defer { scratch.deallocate() }
            let loc: BlockLocation
            if let n = codec.compress(data, into: scratch) {
                loc = try packs.append(
                    id: id, codecTag: codec.tag, rawLength: data.count,
                    payload: UnsafeRawBufferPointer(rebasing: scratch[0..<n]))
            } else {
                loc = try packs.append(id: id, codecTag: 0, rawLength: data.count, payload: data)
            }
            registry.retain(id, location: loc)
            blockCache.put(id, Array(data), cost: data.count)
        }
    }
}

/// A change `BlockStore.observeChanges` reports.
public enum StoreChange: Sendable, Equatable {
    /// A name now refers to a file or snapshot (created, cloned, snapshotted, renamed to).
    case named(String, kind: FileKind)
    /// A name no longer exists (deleted, renamed from).
    case removed(String, kind: FileKind)
    /// A file's contents were replaced in O(1) (`replaceContents`); cached pages are stale.
    case contents(fileID: Int64)
}

/// The loaded files and snapshots, by name and by row id (the FUSE inode), kept in step.
struct OpenFiles {
    private(set) var byName: [String: StoreFile] = [:]
    private(set) var byID: [Int64: StoreFile] = [:]

    mutating func add(_ f: StoreFile, as name: String) {
        byName[name] = f
        byID[f.id] = f
    }

    @discardableResult
    mutating func remove(_ name: String) -> StoreFile? {
        guard let f = byName.removeValue(forKey: name) else { return nil }
        byID[f.id] = nil
        return f
    }
}

/// Blocks referenced by uncommitted file state, with the location of those written to a pack
/// but not yet indexed. GC keeps everything named here; readers find unindexed blocks here.
final class PendingRegistry: Sendable {
    private struct Entry {
        var count: Int
        var location: BlockLocation?
    }
    private let map = Mutex<[BlockID: Entry]>([:])

    func retainIfPresent(_ id: BlockID) -> Bool {
        map.withLock { m in
            guard var e = m[id] else { return false }
            e.count += 1
            m[id] = e
            return true
        }
    }

    func retain(_ id: BlockID, location: BlockLocation?) {
        map.withLock { m in
            if var e = m[id] {
                e.count += 1
                if e.location == nil { e.location = location }
                m[id] = e
            } else {
                m[id] = Entry(count: 1, location: location)
            }
        }
    }

    func release(_ id: BlockID) {
        map.withLock { m in
            guard var e = m[id] else { return }
            e.count -= 1
            m[id] = e.count > 0 ? e : nil
        }
    }

    func location(_ id: BlockID) -> BlockLocation? { map.withLock { $0[id]?.location } }

    /// The ids and the packs holding unindexed blocks, for GC.
    func snapshot() -> (ids: Set<BlockID>, packs: Set<Int64>) {
        map.withLock { m in
            (Set(m.keys), Set(m.values.compactMap { $0.location?.pack }))
        }
    }
}
