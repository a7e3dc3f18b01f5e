import Foundation
import FurcateCore
import GRDB

/// How a file's distinct stored blocks are kept: their count, their bytes raw and as stored.
public struct CompressionStats: Sendable, Codable, Equatable {
    /// Distinct blocks.
    public var blocks = 0
    /// Their bytes uncompressed.
    public var uncompressedBytes: UInt64 = 0
    /// Their payload bytes as stored.
    public var storedBytes: UInt64 = 0
    /// Uncompressed over stored bytes (1 when nothing is stored).
    public var ratio: Double { storedBytes == 0 ? 1 : Double(uncompressedBytes) / Double(storedBytes) }
    /// Zero blocks.
    public init() {}
}

extension BlockStore {
    /// The distinct stored blocks of `name` (holes and zero blocks take no space).
    /// - Throws: `.notFound`.
    public func compressionStats(_ name: String) throws -> CompressionStats {
        try checkOpen()
        let (root, _) = try file(name).committedState()
        var blocks = Set<BlockID>()
        try tree.walk(root, enter: { _ in true }, leaf: { _, e in if e.isStored { blocks.insert(e) } })
        var s = CompressionStats()
        for id in blocks {
            guard let l = try locate(id) else { continue }
            s.blocks += 1
            s.uncompressedBytes += UInt64(l.rawLength)
            s.storedBytes += UInt64(l.storedLength)
        }
        return s
    }

    /// Re-encodes every stored block of `name` with `codec`, in new pack records, and points the
    /// index at them. Content addresses do not change, so files sharing the blocks (clones,
    /// forks) read the same bytes throughout, and a reader that looked a block up before the
    /// switch still reads the old record, which stays until the next GC compacts it away. Runs
    /// under the GC mutex (GC waits); writers and readers are not blocked.
    /// - Parameter isCancelled: polled between batches; a cancelled run keeps what it moved.
    /// - Returns: the file's stats afterwards.
    /// - Throws: `.notFound`, `.damaged` for a block that fails its checks (the rest of the
    ///   batch is not switched), `.diskFull`.
    @discardableResult
    public func recompress(_ name: String, codec: Codec, isCancelled: () -> Bool = { false }) throws -> CompressionStats
    {
        try checkOpen()
        try gcMutex.withLock { _ in
            let (root, _) = try file(name).committedState()
            var ordered: [BlockID] = []
            var seen = Set<BlockID>()
            try tree.walk(
                root, enter: { _ in true },
                leaf: { _, e in if e.isStored, seen.insert(e).inserted { ordered.append(e) } })
            let batch = 512
            var i = 0
            while i < ordered.count, !isCancelled() {
                let slice = ordered[i..<min(i + batch, ordered.count)]
                i += batch
                var moves: [(BlockID, BlockLocation)] = []
                for id in slice {
                    guard let old = try locate(id) else { continue }
                    let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(old.rawLength), alignment: 16)
                    defer { raw.deallocate() }
                    try readBlock(id, at: old, into: raw, file: name)
                    let scratch = UnsafeMutableRawBufferPointer.allocate(
                        byteCount: Codec.bound(raw.count), alignment: 16)
                    defer { scratch.deallocate() }
                    let new: BlockLocation
                    if let n = codec.compress(UnsafeRawBufferPointer(raw), into: scratch) {
                        new = try packs.append(
                            id: id, codecTag: codec.tag, rawLength: raw.count,
                            payload: UnsafeRawBufferPointer(rebasing: scratch[0..<n]))
                    } else if old.codecTag == 0 {
                        continue  // raw already, and the codec would not save enough
                    } else {
                        new = try packs.append(
                            id: id, codecTag: 0, rawLength: raw.count, payload: UnsafeRawBufferPointer(raw))
                    }
                    moves.append((id, new))
                }
                guard !moves.isEmpty else { continue }
                try packs.sync()
                try index.write("recompress \(name)") { db in
                    for (id, l) in moves {
                        try db.execute(
                            sql: "UPDATE blocks SET pack = ?, offset = ?, stored_len = ?, codec = ? WHERE id = ?",
                            arguments: [
                                l.pack, Int64(l.offset), Int64(l.storedLength), Int64(l.codecTag), Data(id.bytes),
                            ])
                    }
                }
            }
        }
        return try compressionStats(name)
    }

    /// Reads and checks one block from a known location.
    private func readBlock(_ id: BlockID, at loc: BlockLocation, into dst: UnsafeMutableRawBufferPointer, file: String)
        throws
    {
        let h = try packs.handle(loc.pack)
        let claimed = try h.readBlock(loc, into: dst)
        guard claimed == id, BlockID.hash(UnsafeRawBufferPointer(dst)) == id else {
            throw FurcateError(
                .damaged, "block \(id) of '\(file)' fails its checks; not recompressed", path: h.path,
                offset: loc.offset)
        }
    }
}
