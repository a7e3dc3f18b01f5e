import Foundation
import FurcateCore
import GRDB

/// What one GC run did.
public struct GCReport: Sendable, Codable, Equatable {
    /// Block rows removed from the index.
    public var blocksFreed = 0
    /// Tree node rows removed from the index.
    public var nodesFreed = 0
    /// Uncompressed bytes of the blocks removed.
    public var bytesFreedInIndex: UInt64 = 0
    /// Packs whose live records were copied into the active pack, then removed.
    public var packsCompacted = 0
    /// Packs with nothing live left, removed.
    public var packsDeleted = 0
    /// Bytes of pack files removed from disk, less what compaction copied.
    public var bytesReclaimedOnDisk: UInt64 = 0
    /// Blocks still referenced after the run.
    public var liveBlocks = 0
    /// Tree nodes still referenced after the run.
    public var liveNodes = 0
    /// How long the run took.
    public var seconds = 0.0
}

/// Reachability from a set of roots: the live nodes and blocks.
struct Reachable {
    var nodes: Set<BlockID> = []
    var blocks: Set<BlockID> = []

    /// Adds everything under `root`, visiting shared subtrees once.
    mutating func mark(_ root: BlockID, tree: BlockTree) throws {
        try tree.walk(root, enter: { nodes.insert($0).inserted }, leaf: { _, e in if e.isStored { blocks.insert(e) } })
    }
}

extension BlockStore {
    /// Frees blocks and nodes no file, snapshot or unsynced write references, then compacts
    /// sealed packs whose live fraction fell below `options.compactionThreshold`.
    ///
    /// Marking runs without blocking writers or readers; only the final sweep holds the GC gate
    /// (briefly stopping new block lookups by writers) while it re-marks roots that changed
    /// meanwhile. Compaction copies live records verbatim and never touches a pack that holds
    /// unindexed blocks. Readers that race with a pack's removal re-read the index.
    public func gc() throws -> GCReport {
        try checkOpen()
        return try gcMutex.withLock { _ in try runGC() }
    }

    private func runGC() throws -> GCReport {
        let start = Date()
        var report = GCReport()
        let sealedBelow = packs.seal()
        let t = tree
        // Phase 1: mark from the roots as they are now, without holding anything.
        var live = Reachable()
        var marked = Set<BlockID>()
        let roots1 = try index.read("gc: roots") { db in try Data.fetchAll(db, sql: "SELECT root FROM files") }
        for r in roots1 {
            guard let id = BlockID([UInt8](r)) else { continue }
            if marked.insert(id).inserted { try live.mark(id, tree: t) }
        }
        // Phase 2: sweep under the gate, re-marking roots committed since phase 1.
        try gcGate.withWriteLock {
            try index.write("gc: sweep") { db in
                for r in try Data.fetchAll(db, sql: "SELECT root FROM files") {
                    guard let id = BlockID([UInt8](r)) else { continue }
                    if marked.insert(id).inserted {
                        // Nodes committed after phase 1 are read through this transaction.
                        let tx = BlockTree(load: { nid in
                            if let n = self.nodeCache.get(nid) { return n }
                            guard let data = try self.index.nodeData(db, nid),
                                let n = data.withUnsafeBytes({ TreeNode.decode($0) })
                            else {
                                throw FurcateError(
                                    .damaged, "tree node \(nid) is missing or malformed", path: self.index.path)
                            }
                            return n
                        })
                        try live.mark(id, tree: tx)
                    }
                }
                let protected = registry.snapshot().ids
                var deadBlocks: [(Data, Int64)] = []
                let rows = try Row.fetchCursor(db, sql: "SELECT id, raw_len FROM blocks")
                while let row = try rows.next() {
                    let d: Data = row["id"]
                    guard let id = BlockID([UInt8](d)) else { continue }
                    if !live.blocks.contains(id) && !protected.contains(id) { deadBlocks.append((d, row["raw_len"])) }
                }
                var deadNodes: [Data] = []
                let nrows = try Data.fetchCursor(db, sql: "SELECT id FROM nodes")
                while let d = try nrows.next() {
                    guard let id = BlockID([UInt8](d)) else { continue }
                    if !live.nodes.contains(id) { deadNodes.append(d) }
                }
                for (d, raw) in deadBlocks {
                    try db.execute(sql: "DELETE FROM blocks WHERE id = ?", arguments: [d])
                    report.bytesFreedInIndex += UInt64(raw)
                }
                for d in deadNodes { try db.execute(sql: "DELETE FROM nodes WHERE id = ?", arguments: [d]) }
                report.blocksFreed = deadBlocks.count
                report.nodesFreed = deadNodes.count
            }
        }
        report.liveBlocks = live.blocks.count
        report.liveNodes = live.nodes.count
        try compact(&report, sealedBelow: sealedBelow)
        report.seconds = Date().timeIntervalSince(start)
        logger.info(
            "gc done",
            metadata: [
                "gc.blocks_freed": "\(report.blocksFreed)", "gc.nodes_freed": "\(report.nodesFreed)",
                "gc.packs_compacted": "\(report.packsCompacted)", "gc.packs_deleted": "\(report.packsDeleted)",
            ])
        return report
    }

    /// Copies the live records of sparse sealed packs into the active pack and deletes them.
    private func compact(_ report: inout GCReport, sealedBelow: Int64) throws {
        // Under the gate no writer is between appending a record and registering it, so every
        // unindexed record in a sealed pack is in this snapshot.
        let pendingPacks = gcGate.withWriteLock { registry.snapshot().packs }
        let liveBytes = try index.read("gc: live bytes") { db in
            var m: [Int64: UInt64] = [:]
            for row in try Row.fetchAll(
                db, sql: "SELECT pack, SUM(stored_len) AS s, COUNT(*) AS n FROM blocks GROUP BY pack")
            {
                m[row["pack"]] =
                    UInt64(row["s"] as Int64) + UInt64(row["n"] as Int64) * UInt64(PackFormat.recordHeaderSize)
            }
            return m
        }
        for pack in packs.packIDsOnDisk() where pack < sealedBelow && !pendingPacks.contains(pack) {
            guard let size = packs.size(of: pack) else { continue }
            let live = liveBytes[pack] ?? 0
            if live == 0 {
                packs.remove(pack)
                report.packsDeleted += 1
                report.bytesReclaimedOnDisk += size
                continue
            }
            guard Double(live) / Double(max(size, 1)) < options.compactionThreshold else { continue }
            let rows = try index.read("gc: pack rows") { db in
                try Row.fetchAll(
                    db, sql: "SELECT id, pack, offset, stored_len, raw_len, codec FROM blocks WHERE pack = ?",
                    arguments: [pack])
            }
            let h = try packs.handle(pack)
            var moves: [(Data, BlockLocation)] = []
            for row in rows {
                let old = StoreIndex.location(row)
                let bytes: [UInt8]
                do {
                    bytes = try h.readRecordBytes(old)
                } catch let e as FurcateError where e.code == .damaged {
                    // Leave damaged records where fsck can find and quarantine them; keep the pack.
                    logger.error(
                        "gc: damaged record left in place",
                        metadata: ["pack.path": "\(h.path)", "pack.offset": "\(old.offset)"])
                    moves.removeAll()
                    break
                }
                let new = try packs.appendRecord(bytes, codecTag: old.codecTag, rawLength: old.rawLength)
                moves.append((row["id"], new))
            }
            guard moves.count == rows.count else { continue }
            try packs.sync()
            try index.write("gc: move records") { db in
                for (id, l) in moves {
                    try db.execute(
                        sql: "UPDATE blocks SET pack = ?, offset = ? WHERE id = ? AND pack = ?",
                        arguments: [l.pack, Int64(l.offset), id, pack])
                }
            }
            packs.remove(pack)
            report.packsCompacted += 1
            report.bytesReclaimedOnDisk += size - live
        }
    }
}
