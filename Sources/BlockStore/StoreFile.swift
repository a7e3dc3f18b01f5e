import Foundation
import FurcateCore
import GRDB

/// One named file or snapshot of a store, with its unsynced state.
///
/// Writes land in memory (`dirty`, whole blocks) and are hashed, compressed and appended to a
/// pack when the store's dirty budget is exceeded or at `sync()`; `sync()` then writes the new
/// tree nodes and root in one index transaction — the durability point. Reads see every write
/// at once. All methods are thread-safe; reads of one file run in parallel.
public final class StoreFile: @unchecked Sendable {
    // SAFETY (@unchecked): every mutable field below is guarded by `lock`.
    unowned let store: BlockStore
    /// The row id: stable across renames, unique for the store's life (an inode number).
    public let id: Int64
    /// File (writable) or snapshot (read-only).
    public let kind: FileKind
    /// Bytes per block.
    public let blockSize: Int
    let codec: Codec
    let createdAt: Double
    let lock = RWLock()

    private var _name: String
    private var root: BlockID
    private var committedSize: UInt64
    private var _size: UInt64
    private var modifiedAt: Double
    /// Whole blocks written since they were last flushed, uncompressed.
    private var dirty: [UInt64: [UInt8]] = [:]
    /// Entries flushed to packs (or `hole`/`zero`) but not yet in the tree.
    private var pending: [UInt64: BlockID] = [:]
    /// Block ranges made holes since the last sync; applied to the tree before `pending`.
    private var clears: [Range<UInt64>] = []
    private var discarded = false

    init(store: BlockStore, row: FileRow) {
        self.store = store
        id = row.id
        kind = row.kind
        blockSize = row.blockSize
        codec = row.codec
        createdAt = row.createdAt
        _name = row.name
        root = row.root
        committedSize = row.size
        _size = row.size
        modifiedAt = row.modifiedAt
    }

    /// The current name.
    public var name: String { lock.withReadLock { _name } }
    /// The current size in bytes, including unsynced writes.
    public var size: UInt64 { lock.withReadLock { _size } }
    /// The largest size a file of this block size can have.
    public var maxSize: UInt64 { min(BlockTree.maxBlocks * UInt64(blockSize), UInt64(Int64.max)) }
    /// Seconds since 1970 of the last write or truncate.
    public var modificationTime: Double { lock.withReadLock { modifiedAt } }
    /// True while some writes are not yet synced.
    public var hasUnsyncedChanges: Bool { lock.withReadLock { isDirtyLocked } }
    /// True for a read-only snapshot.
    public var isSnapshot: Bool { kind == .snapshot }

    private var isDirtyLocked: Bool { !dirty.isEmpty || !pending.isEmpty || !clears.isEmpty || _size != committedSize }

    func renamed(_ n: String) { lock.withWriteLock { _name = n } }

    /// Drops unsynced state after the file was deleted.
    func discard() {
        lock.withWriteLock {
            releaseDirtyAccounting()
            for e in pending.values where e.isStored { store.registry.release(e) }
            pending.removeAll()
            clears.removeAll()
            discarded = true
        }
    }

    private func checkLive() throws {
        if discarded { throw FurcateError(.notFound, "'\(_name)' was deleted") }
    }

    private func checkWritable() throws {
        try checkLive()
        try store.checkOpen()
        if kind == .snapshot {
            throw FurcateError(.notPermitted, "'\(_name)' is a snapshot and cannot be changed")
        }
    }

    // MARK: read

    /// The entry of block `i` as the file stands now (excluding `dirty`). Needs the lock.
    private func entryLocked(_ i: UInt64) throws -> BlockID {
        if let e = pending[i] { return e }
        for c in clears where c.contains(i) { return .hole }
        return try store.tree.lookup(root, i)
    }

    /// Reads up to `buffer.count` bytes at `offset`; returns how many (fewer only at end of file).
    /// Holes read as zeros.
    /// - Throws: `.damaged` (an I/O error to the caller) naming the file and offset; never wrong data.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        try lock.withReadLock {
            try checkLive()
            try store.checkOpen()
            guard offset < _size else { return 0 }
            let n = Int(min(UInt64(buffer.count), _size - offset))
            let bs = UInt64(blockSize)
            var done = 0
            while done < n {
                let pos = offset + UInt64(done)
                let i = pos / bs
                let within = Int(pos % bs)
                let len = min(blockSize - within, n - done)
                let out = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + len)])
                if let d = dirty[i] {
                    d.withUnsafeBytes {
                        out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[within..<(within + len)]))
                    }
                } else {
                    let e = try entryLocked(i)
                    if !e.isStored {
                        out.initializeMemory(as: UInt8.self, repeating: 0)
                    } else {
                        let block = try store.blockData(e, size: blockSize, file: _name, fileOffset: i * bs)
                        block.withUnsafeBytes {
                            out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[within..<(within + len)]))
                        }
                    }
                }
                done += len
            }
            return n
        }
    }

    /// Reads `count` bytes at `offset` (fewer at end of file).
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        out.removeLast(count - n)
        return out
    }

    // MARK: write

    /// Writes `data` at `offset`, extending the file when it ends past the end.
    /// - Throws: `.notPermitted` on a snapshot, `.invalidArgument` past `maxSize`, `.diskFull`/`.io`
    ///   when flushing to packs fails (the written data stays in memory, unsynced).
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let needFlush: Bool = try lock.withWriteLock {
            try checkWritable()
            let (end, overflow) = offset.addingReportingOverflow(UInt64(data.count))
            guard !overflow, end <= maxSize else {
                throw FurcateError(
                    .invalidArgument, "write past the largest file size \(maxSize)", path: _name, offset: offset)
            }
            guard !data.isEmpty else { return false }
            let bs = UInt64(blockSize)
            var done = 0
            while done < data.count {
                let pos = offset + UInt64(done)
                let i = pos / bs
                let within = Int(pos % bs)
                let len = min(blockSize - within, data.count - done)
                let src = UnsafeRawBufferPointer(rebasing: data[done..<(done + len)])
                if within == 0 && len == blockSize {
                    if dirty[i] == nil { store.dirtyBytes.add(blockSize, ordering: .relaxed) }
                    dirty[i] = Array(src)
                } else {
                    try modifyBlockLocked(i) { buf in
                        UnsafeMutableRawBufferPointer(rebasing: buf[within..<(within + len)]).copyMemory(from: src)
                    }
                }
                done += len
            }
            _size = max(_size, end)
            modifiedAt = Date().timeIntervalSince1970
            return store.dirtyBytes.load(ordering: .relaxed) > store.options.dirtyBudgetBytes
        }
        if needFlush { try lock.withWriteLock { try flushDirtyLocked(store) } }
    }

    /// Writes `bytes` at `offset`.
    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// Read-modify-write of block `i` in the dirty map. Needs the write lock.
    private func modifyBlockLocked(_ i: UInt64, _ body: (UnsafeMutableRawBufferPointer) -> Void) throws {
        if dirty[i] != nil {
            dirty[i]?.withUnsafeMutableBytes(body)
            return
        }
        let e = try entryLocked(i)
        var buf =
            e.isStored
            ? try store.blockData(e, size: blockSize, file: _name, fileOffset: i * UInt64(blockSize))
            : [UInt8](repeating: 0, count: blockSize)
        buf.withUnsafeMutableBytes(body)  // copy-on-write: the cached block is left untouched
        dirty[i] = buf
        store.dirtyBytes.add(blockSize, ordering: .relaxed)
    }

    /// Zeros bytes [from, to) of block `i` unless it is a hole (a hole already reads as zeros).
    private func zeroWithinBlockLocked(_ i: UInt64, from: Int, to: Int) throws {
        guard from < to else { return }
        if dirty[i] == nil, try !entryLocked(i).isStored { return }  // hole or zeros: already zero
        try modifyBlockLocked(i) { b in
            UnsafeMutableRawBufferPointer(rebasing: b[from..<to]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Makes whole blocks [lo, hi) holes. Needs the write lock.
    private func clearBlocksLocked(_ lo: UInt64, _ hi: UInt64) {
        guard lo < hi else { return }
        let span = hi - lo
        if UInt64(dirty.count) < span {
            for k in dirty.keys where k >= lo && k < hi {
                dirty[k] = nil; store.dirtyBytes.subtract(blockSize, ordering: .relaxed)
            }
        } else {
            for k in lo..<hi where dirty[k] != nil {
                dirty[k] = nil; store.dirtyBytes.subtract(blockSize, ordering: .relaxed)
            }
        }
        let keys =
            UInt64(pending.count) < span
            ? Array(pending.keys.filter { $0 >= lo && $0 < hi }) : (lo..<hi).filter { pending[$0] != nil }
        for k in keys {
            if let e = pending.removeValue(forKey: k), e.isStored { store.registry.release(e) }
        }
        // Merge with an overlapping or adjacent range to keep the list short.
        var r = lo..<hi
        clears.removeAll { c in
            if c.lowerBound <= r.upperBound && r.lowerBound <= c.upperBound {
                r = min(c.lowerBound, r.lowerBound)..<max(c.upperBound, r.upperBound)
                return true
            }
            return false
        }
        clears.append(r)
    }

    /// Sets the size. Shrinking drops the blocks past the end; growing adds a hole.
    /// - Throws: `.notPermitted` on a snapshot, `.invalidArgument` past `maxSize`.
    public func truncate(to newSize: UInt64) throws {
        try lock.withWriteLock {
            try checkWritable()
            guard newSize <= maxSize else {
                throw FurcateError(
                    .invalidArgument, "size \(newSize) is past the largest file size \(maxSize)", path: _name)
            }
            if newSize < _size {
                let bs = UInt64(blockSize)
                let keep = (newSize + bs - 1) / bs
                clearBlocksLocked(keep, BlockTree.maxBlocks)
                // Invariant: bytes past the end of the last block read as zeros after a later extend.
                if newSize % bs != 0 {
                    try zeroWithinBlockLocked(newSize / bs, from: Int(newSize % bs), to: blockSize)
                }
            }
            _size = newSize
            modifiedAt = Date().timeIntervalSince1970
        }
    }

    /// Deallocates [offset, offset+length): whole blocks become holes, partial ones are zeroed.
    /// The size does not change (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE). Past the end is a no-op.
    public func punchHole(offset: UInt64, length: UInt64) throws {
        try lock.withWriteLock {
            try checkWritable()
            let end = min(offset &+ length < offset ? UInt64.max : offset + length, _size)
            guard offset < end else { return }
            let bs = UInt64(blockSize)
            let firstWhole = (offset + bs - 1) / bs
            let lastWhole = end / bs  // exclusive
            if firstWhole < lastWhole {
                clearBlocksLocked(firstWhole, lastWhole)
            }
            let startBlock = offset / bs
            if firstWhole > startBlock || firstWhole >= lastWhole {
                // The head partial block (or the whole range inside one block).
                let blockEnd = min((startBlock + 1) * bs, end)
                try zeroWithinBlockLocked(
                    startBlock, from: Int(offset - startBlock * bs), to: Int(blockEnd - startBlock * bs))
            }
            let tailBlock = end / bs
            if end % bs != 0 && tailBlock > startBlock {
                try zeroWithinBlockLocked(tailBlock, from: 0, to: Int(end - tailBlock * bs))
            }
            modifiedAt = Date().timeIntervalSince1970
        }
    }

    // MARK: holes

    /// The first block index ≥ `i` holding data (written, possibly zeros), or nil. Needs the lock.
    private func nextAllocatedLocked(from i: UInt64) throws -> UInt64? {
        let limit = (_size + UInt64(blockSize) - 1) / UInt64(blockSize)
        // Candidates: the next dirty or pending data entry, and the next allocated tree entry
        // that no clear or pending entry overrides.
        var best: UInt64? = nil
        for d in dirty.keys where d >= i && d < limit { best = min(best ?? d, d) }
        for (p, e) in pending where p >= i && p < limit && !e.isHole { best = min(best ?? p, p) }
        var t = i
        while let a = try store.tree.nextAllocated(root, from: t), a < (best ?? limit) {
            if let c = clears.first(where: { $0.contains(a) }) { t = c.upperBound; continue }
            if pending[a] != nil { t = a + 1; continue }  // pending decides it, counted above
            best = a
            break
        }
        return best
    }

    /// SEEK_DATA: the first offset ≥ `offset` inside written data, or nil when only holes follow.
    public func nextData(from offset: UInt64) throws -> UInt64? {
        try lock.withReadLock {
            try checkLive()
            guard offset < _size else { return nil }
            let bs = UInt64(blockSize)
            guard let i = try nextAllocatedLocked(from: offset / bs) else { return nil }
            return max(offset, i * bs)
        }
    }

    /// SEEK_HOLE: the first offset ≥ `offset` in a hole; the file size when data runs to the end.
    public func nextHole(from offset: UInt64) throws -> UInt64 {
        try lock.withReadLock {
            try checkLive()
            guard offset < _size else { return _size }
            let bs = UInt64(blockSize)
            var i = offset / bs
            let limit = (_size + bs - 1) / bs
            while i < limit {
                if dirty[i] != nil { i += 1; continue }
                let e = try entryLocked(i)
                if e.isHole { return max(offset, i * bs) }
                if pending[i] == nil, clears.isEmpty {
                    // Skip a run of allocated entries in the tree at once.
                    let h = try store.tree.nextHole(root, from: i)
                    var j = i + 1
                    while j < h && j < limit && dirty[j] == nil && pending[j] == nil { j += 1 }
                    i = j
                    continue
                }
                i += 1
            }
            return _size
        }
    }

    // MARK: flush and sync

    private func releaseDirtyAccounting() {
        if !dirty.isEmpty { store.dirtyBytes.subtract(dirty.count * blockSize, ordering: .relaxed) }
        dirty.removeAll()
    }

    /// Hashes, compresses and appends every dirty block to a pack. Needs the write lock.
    ///
    /// Hashing and compression (the costly part) run on every core at once; pack appends are
    /// serialized by the pack set. Blocks that failed (a full disk) stay dirty for a retry.
    private func flushDirtyLocked(_ store: BlockStore) throws {
        guard !dirty.isEmpty else { return }
        let entries = dirty.sorted { $0.key < $1.key }
        let keys = entries.map(\.key)
        let blocks = entries.map(\.value)
        let codec = codec
        let results = Self.parallelMap(blocks.count) { j -> Result<BlockID, any Error> in
            Result {
                try blocks[j].withUnsafeBytes { raw in
                    if Self.isZero(raw) { return .zero }
                    let id = BlockID.hash(raw)
                    try store.storePending(id, raw, codec: codec)
                    return id
                }
            }
        }
        var firstError: (any Error)?
        for (k, r) in zip(keys, results) {
            switch r {
            case .success(let e):
                if let old = pending[k], old.isStored { store.registry.release(old) }
                pending[k] = e
                dirty[k] = nil
                store.dirtyBytes.subtract(blockSize, ordering: .relaxed)
            case .failure(let error):
                if firstError == nil { firstError = error }
            }
        }
        if let firstError { throw firstError }
    }

    /// `body(0..<count)` spread over the machine's cores, in order. Small batches run inline.
    static func parallelMap<T: Sendable>(_ count: Int, _ body: @Sendable (Int) -> T) -> [T] {
        let workers = min(ProcessInfo.processInfo.activeProcessorCount, count / 4)
        guard workers > 1 else { return (0..<count).map(body) }
        return [T](unsafeUninitializedCapacity: count) { buf, n in
            // SAFETY: each index is initialized exactly once, by one worker; the array takes
            // ownership of all `count` elements once concurrentPerform has returned.
            guard let base = buf.baseAddress else {
                n = 0
                return
            }
            let out = UnsafeSendablePointer(base: base)
            withoutActuallyEscaping(body) { body in
                DispatchQueue.concurrentPerform(iterations: workers) { w in
                    var j = w
                    while j < count {
                        (out.base + j).initialize(to: body(j))
                        j += workers
                    }
                }
            }
            n = count
        }
    }

    static func isZero(_ p: UnsafeRawBufferPointer) -> Bool {
        let words = p.count / 8
        guard let w = p.baseAddress?.assumingMemoryBound(to: UInt64.self) else { return true }  // no bytes
        var acc: UInt64 = 0
        var i = 0
        while i < words {
            acc |= w[i]
            if i & 63 == 63 && acc != 0 { return false }
            i += 1
        }
        for j in (words * 8)..<p.count where p[j] != 0 { return false }
        return acc == 0
    }

    /// Makes every write so far durable: blocks to packs, packs fsynced, then the new tree and
    /// size committed in one index transaction. Once it returns no crash loses those writes.
    /// - Throws: `.diskFull`/`.io`; the unsynced state is kept for a later retry.
    public func sync() throws {
        try sync(in: store)
    }

    /// `sync()` with the store passed in, for `BlockStore.close()` run from its `deinit`.
    func sync(in store: BlockStore) throws {
        try lock.withWriteLock { try syncHoldingLock(store) }
    }

    private func syncHoldingLock(_ store: BlockStore) throws {
        try checkLive()
        guard isDirtyLocked, kind == .file else { return }
        try flushDirtyLocked(store)
        try store.packs.sync()
        var created: [(BlockID, [UInt8])] = []
        let sets = pending.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        let newRoot = try store.tree.apply(root, clears: clears, sets: sets, created: &created)
        let newSize = _size
        let fileID = id
        let stored = Set(pending.values.filter(\.isStored))
        let mtime = modifiedAt
        try store.index.write("sync \(_name)") { db in
            for id in stored {
                if let loc = store.registry.location(id) { try store.index.insertBlock(db, id, loc) }
            }
            for (id, data) in created { try store.index.insertNode(db, id, data) }
            try db.execute(
                sql: "UPDATE files SET root = ?, size = ?, modified_at = ?, generation = generation + 1 WHERE id = ?",
                arguments: [Data(newRoot.bytes), Int64(newSize), mtime, fileID])
            if db.changesCount != 1 { throw FurcateError(.notFound, "file row vanished during sync") }
        }
        // Decoded copies of the new nodes are likely to be read next.
        for (id, data) in created {
            if let n = data.withUnsafeBytes({ TreeNode.decode($0) }) { store.nodeCache.put(id, n, cost: 8 << 10) }
        }
        for e in pending.values where e.isStored { store.registry.release(e) }
        pending.removeAll()
        clears.removeAll()
        root = newRoot
        committedSize = newSize
    }

    /// Replaces this file's contents with a committed tree (see `BlockStore.replaceContents`).
    func replace(root newRoot: BlockID, size newSize: UInt64) throws {
        try lock.withWriteLock {
            try checkWritable()
            let now = Date().timeIntervalSince1970
            let fileID = id
            try store.index.write("replace \(_name)") { db in
                try db.execute(
                    sql:
                        "UPDATE files SET root = ?, size = ?, modified_at = ?, generation = generation + 1 WHERE id = ?",
                    arguments: [Data(newRoot.bytes), Int64(newSize), now, fileID])
            }
            releaseDirtyAccounting()
            for e in pending.values where e.isStored { store.registry.release(e) }
            pending.removeAll()
            clears.removeAll()
            root = newRoot
            committedSize = newSize
            _size = newSize
            modifiedAt = now
        }
    }

    /// Syncs, then returns the committed root and size atomically (for clone and snapshot).
    func committedState() throws -> (BlockID, UInt64) {
        try lock.withWriteLock {
            try checkLive()
            try syncHoldingLock(store)
            return (root, committedSize)
        }
    }

    /// True when both files hold the same synced contents (one was cloned from the other and
    /// neither changed since): a copy between them is a no-op.
    public func hasSameContents(as other: StoreFile) -> Bool {
        guard other !== self else { return true }
        let a = lock.withReadLock { (root, committedSize, isDirtyLocked) }
        let b = other.lock.withReadLock { (other.root, other.committedSize, other.isDirtyLocked) }
        return !a.2 && !b.2 && a.0 == b.0 && a.1 == b.1 && blockSize == other.blockSize
    }

    /// The committed root (for GC, fsck and stats).
    var committedRoot: BlockID { lock.withReadLock { root } }
}

/// A pointer handed to worker threads that write disjoint elements of it.
private struct UnsafeSendablePointer<T>: @unchecked Sendable {
    let base: UnsafeMutablePointer<T>
}
