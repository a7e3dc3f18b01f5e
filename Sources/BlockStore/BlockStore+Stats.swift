import Foundation
import FurcateCore
import GRDB

/// What `furcate store stats` prints.
public struct StoreStats: Sendable, Codable, Equatable {
    /// Files (writable).
    public var files = 0
    /// Snapshots (read-only).
    public var snapshots = 0
    /// Sum of the sizes of all files and snapshots.
    public var logicalBytes: UInt64 = 0
    /// Bytes of data blocks all files and snapshots reference, counting shared blocks each time.
    public var referencedBytes: UInt64 = 0
    /// Distinct blocks in the index and their uncompressed bytes.
    public var blocks = 0
    /// Uncompressed bytes of the distinct blocks.
    public var uniqueBytes: UInt64 = 0
    /// Bytes of those blocks as stored (compressed payloads plus record headers).
    public var storedBytes: UInt64 = 0
    /// Bytes of pack files on disk (includes garbage GC has not yet reclaimed).
    public var packBytes: UInt64 = 0
    /// Pack files on disk.
    public var packs = 0
    /// Tree nodes in the index.
    public var nodes = 0
    /// referencedBytes / uniqueBytes.
    public var dedupRatio = 1.0
    /// uniqueBytes / storedBytes.
    public var compressionRatio = 1.0
}

extension BlockStore {
    /// Sizes and ratios of the store. Shared subtrees are counted once per referencing file
    /// without being walked again, so this is proportional to distinct nodes, not to clones.
    public func stats() throws -> StoreStats {
        try checkOpen()
        try syncAll()
        var s = StoreStats()
        let rows = try index.read("stats: files") { db in try index.files(db) }
        let t = tree
        var memo: [BlockID: UInt64] = [:]  // node id -> data bytes under it
        func bytes(_ id: BlockID, level: Int, blockSize: UInt64) throws -> UInt64 {
            if id.isHole { return 0 }
            if let m = memo[id] { return m }
            let n = try t.load(id)
            var total: UInt64 = 0
            for e in n.slots where !e.isHole {
                total +=
                    level == 0 ? (e.isStored ? blockSize : 0) : try bytes(e, level: level - 1, blockSize: blockSize)
            }
            memo[id] = total
            return total
        }
        for r in rows {
            if r.kind == .file { s.files += 1 } else { s.snapshots += 1 }
            s.logicalBytes += r.size
            s.referencedBytes += try bytes(r.root, level: BlockTree.depth - 1, blockSize: UInt64(r.blockSize))
        }
        try index.read("stats: blocks") { db in
            if let row = try Row.fetchOne(
                db,
                sql: "SELECT COUNT(*) AS n, COALESCE(SUM(raw_len),0) AS r, COALESCE(SUM(stored_len),0) AS s FROM blocks"
            ) {
                s.blocks = row["n"]
                s.uniqueBytes = UInt64(row["r"] as Int64)
                s.storedBytes = UInt64(row["s"] as Int64) + UInt64(s.blocks * PackFormat.recordHeaderSize)
            }
            s.nodes = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM nodes") ?? 0
        }
        for p in packs.packIDsOnDisk() {
            s.packs += 1
            s.packBytes += packs.size(of: p) ?? 0
        }
        if s.uniqueBytes > 0 { s.dedupRatio = Double(s.referencedBytes) / Double(s.uniqueBytes) }
        if s.storedBytes > 0 { s.compressionRatio = Double(s.uniqueBytes) / Double(s.storedBytes) }
        return s
    }
}
