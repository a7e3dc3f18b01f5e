import Foundation
import FurcateCore
import GRDB

/// One damaged place found by fsck.
public struct DamageReport: Sendable, Codable, Equatable {
    /// File or snapshot name.
    public var file: String
    /// Byte offset in that file of the damaged block.
    public var offset: UInt64
    /// The block (or node) id, hex.
    public var block: String
    /// What is wrong with it (CRC, length, hash, decompression, a missing pack).
    public var reason: String
}

/// What `fsck` found.
public struct FsckReport: Sendable, Codable, Equatable {
    /// Files and snapshots walked.
    public var files = 0
    /// Tree nodes loaded and checked (hash and encoding).
    public var nodesChecked = 0
    /// Reachable blocks read and checked.
    public var blocksChecked = 0
    /// Bytes of those blocks, uncompressed.
    public var bytesChecked: UInt64 = 0
    /// Damaged blocks, by every file and offset that references them.
    public var damage: [DamageReport] = []
    /// Problems not tied to a file offset (bad pack headers, unreadable nodes, …).
    public var problems: [String] = []
    /// Blocks moved to quarantine by `--repair`.
    public var quarantined = 0
    /// Indexed blocks no file references (GC frees them); not an error.
    public var unreferencedBlocks = 0
    /// Nothing damaged and no problem found (unreferenced blocks do not count).
    public var clean: Bool { damage.isEmpty && problems.isEmpty }
}

extension BlockStore {
    /// Verifies every reachable tree node (hash, encoding) and block (record checksum,
    /// decompression, SHA-256), and every pack header. With `repair`, damaged blocks are moved
    /// to quarantine: reads of them keep failing with an I/O error, and the same content
    /// written again is stored afresh.
    public func fsck(repair: Bool = false) throws -> FsckReport {
        try checkOpen()
        try syncAll()
        var report = FsckReport()
        let rows = try index.read("fsck: files") { db in try index.files(db) }
        report.files = rows.count
        // Nodes are loaded straight from the index so a cached copy cannot hide damage.
        var badNodes: [BlockID: String] = [:]
        let checked = BlockTree(load: { id in
            guard let data = try self.index.read("fsck: node", { db in try self.index.nodeData(db, id) }) else {
                throw FurcateError(.damaged, "tree node \(id.hex) is missing")
            }
            return try data.withUnsafeBytes { raw in
                guard BlockID.hash(raw) == id else {
                    throw FurcateError(.damaged, "tree node \(id.hex) fails its hash check")
                }
                guard let n = TreeNode.decode(raw) else {
                    throw FurcateError(.damaged, "tree node \(id.hex) is malformed")
                }
                return n
            }
        })
        var reachable = Reachable()
        for r in rows {
            do {
                try reachable.mark(r.root, tree: checked)
            } catch let e as FurcateError {
                badNodes[r.root] = e.message
                report.problems.append("'\(r.name)': \(e.message)")
            }
        }
        report.nodesChecked = reachable.nodes.count

        // Every reachable block, once.
        var damaged: [BlockID: String] = [:]
        var buf = [UInt8](repeating: 0, count: Self.blockSizeRange.upperBound)
        for id in reachable.blocks.sorted() {
            guard let loc = try index.read("fsck: locate", { db in try index.location(db, id) }) else {
                let q = try index.read("fsck: quarantine") { db in
                    try Bool.fetchOne(db, sql: "SELECT 1 FROM quarantine WHERE id = ?", arguments: [Data(id.bytes)])
                        ?? false
                }
                damaged[id] = q ? "block is quarantined" : "block is missing from the index"
                continue
            }
            report.blocksChecked += 1
            report.bytesChecked += UInt64(loc.rawLength)
            do {
                guard Int(loc.rawLength) <= buf.count else {
                    throw FurcateError(.damaged, "index claims a \(loc.rawLength)-byte block")
                }
                let h = try packs.handle(loc.pack)
                try buf.withUnsafeMutableBytes { b in
                    let dst = UnsafeMutableRawBufferPointer(rebasing: b[0..<Int(loc.rawLength)])
                    let claimed = try h.readBlock(loc, into: dst)
                    guard claimed == id else { throw FurcateError(.damaged, "record holds block \(claimed.hex)") }
                    guard BlockID.hash(UnsafeRawBufferPointer(dst)) == id else {
                        throw FurcateError(.damaged, "block content fails its SHA-256 check")
                    }
                }
            } catch let e as FurcateError where e.code == .damaged || e.code == .notFound {
                damaged[id] = "\(e.message) (pack \(loc.pack) offset \(loc.offset))"
            }
        }

        // Name every file and offset that references a damaged block.
        if !damaged.isEmpty {
            for r in rows where !badNodes.keys.contains(r.root) {
                try checked.walk(r.root, enter: { _ in true }) { i, e in
                    if let why = damaged[e] {
                        report.damage.append(
                            DamageReport(file: r.name, offset: i * UInt64(r.blockSize), block: e.hex, reason: why))
                    }
                }
            }
        }
        for p in packs.packIDsOnDisk() {
            do {
                let h = try packs.handle(p)
                var hdr = [UInt8](repeating: 0, count: PackFormat.headerSize)
                try hdr.withUnsafeMutableBytes { try h.preadFully($0, at: 0) }
                let id = try hdr.withUnsafeBytes { try PackFormat.checkHeader($0, path: h.path) }
                if id != p { report.problems.append("pack \(h.path) names itself pack \(id)") }
            } catch let e as FurcateError {
                report.problems.append(e.description)
            }
        }
        report.unreferencedBlocks =
            try index.read("fsck: count") { db in
                try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM blocks") ?? 0
            } - report.blocksChecked

        if repair {
            let toQuarantine = damaged.filter {
                !$0.value.hasPrefix("block is quarantined") && !$0.value.hasPrefix("block is missing")
            }
            try index.write("fsck: quarantine") { db in
                for (id, why) in toQuarantine {
                    try db.execute(
                        sql: """
                            INSERT OR REPLACE INTO quarantine(id, pack, offset, stored_len, raw_len, codec, reason, at)
                            SELECT id, pack, offset, stored_len, raw_len, codec, ?, ? FROM blocks WHERE id = ?
                            """, arguments: [why, Date().timeIntervalSince1970, Data(id.bytes)])
                    try db.execute(sql: "DELETE FROM blocks WHERE id = ?", arguments: [Data(id.bytes)])
                }
            }
            for id in toQuarantine.keys { blockCache.remove(id) }
            report.quarantined = toQuarantine.count
        }
        report.damage.sort { ($0.file, $0.offset) < ($1.file, $1.offset) }
        return report
    }
}
