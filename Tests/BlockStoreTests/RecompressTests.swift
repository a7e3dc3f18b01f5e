import Foundation
import FurcateCore
import FurcateTestSupport
import Testing

@testable import BlockStore

/// Recompression re-encodes a file's blocks in place of the old records: same bytes for every
/// file sharing them, smaller (or differently encoded) storage, a clean fsck after GC.
@Suite(.ownThread) struct RecompressTests {
    /// Text-like data that compresses well but not trivially.
    func compressible(_ n: Int, seed: UInt64) -> [UInt8] {
        var rng = SplitMix64(seed: seed)
        let words = ["alpha ", "beta ", "gamma ", "delta ", "fork ", "snapshot ", "memory ", "page "].map {
            Array($0.utf8)
        }
        var out: [UInt8] = []
        out.reserveCapacity(n)
        while out.count < n { out += words[Int(rng.next() % 8)] }
        return Array(out.prefix(n))
    }

    @Test func recompressKeepsContentAndChangesStorage() throws {
        let (tmp, s) = try makeStore(blockSize: 65536, codec: .none)
        defer { withExtendedLifetime(tmp) {} }
        let f = try s.createFile("mem")
        let data = compressible(4 << 20, seed: 7)
        try f.write(data, at: 0)
        try f.truncate(to: 6 << 20)  // a hole at the end takes nothing
        try f.sync()
        try s.snapshot("mem", as: "snap")
        try s.clone("snap", to: "fork")
        let before = try s.compressionStats("snap")
        #expect(before.blocks == 64 && before.uncompressedBytes == 4 << 20)
        #expect(before.storedBytes == before.uncompressedBytes, "codec none stores raw")

        let z = try s.recompress("snap", codec: .zstd(level: 3))
        #expect(z.blocks == 64 && z.uncompressedBytes == before.uncompressedBytes)
        #expect(z.ratio > 3, "text compresses: \(z)")
        let fork = try s.file("fork")
        #expect(
            sameBytes(try fork.read(at: 0, count: data.count), data), "a clone sharing the blocks reads the same bytes")
        #expect(try s.compressionStats("fork") == z, "the blocks are shared: the clone's storage changed too")

        let l = try s.recompress("snap", codec: .lz4hc(level: 9))
        #expect(l.ratio > 2 && l.storedBytes != z.storedBytes, "\(l)")
        _ = try s.gc()
        #expect(sameBytes(try s.file("snap").read(at: 0, count: data.count), data))
        let report = try s.fsck()
        #expect(report.damage.isEmpty && report.problems.isEmpty, "\(report)")

        // Back to none: stored raw again.
        let n = try s.recompress("snap", codec: .none)
        #expect(n.storedBytes == n.uncompressedBytes)
        s.close()
        let reopened = try BlockStore.open(at: tmp.sub("s"))
        defer { reopened.close() }
        #expect(
            sameBytes(try reopened.file("fork").read(at: 0, count: data.count), data), "the index change is durable")
    }

    @Test func cancelledRecompressionKeepsWhatItMovedAndReadsStayCorrect() throws {
        let (tmp, s) = try makeStore(blockSize: 4096, codec: .none)
        defer { withExtendedLifetime(tmp) {} }
        let f = try s.createFile("f")
        let data = compressible(8 << 20, seed: 9)
        try f.write(data, at: 0)
        try f.sync()
        var polls = 0
        let r = try s.recompress("f", codec: .lz4) {
            polls += 1
            return polls > 1  // one batch, then cancelled
        }
        #expect(r.blocks == 2048)
        #expect(
            r.storedBytes < r.uncompressedBytes && r.storedBytes > r.uncompressedBytes / 8,
            "only part was re-encoded: \(r)")
        #expect(sameBytes(try s.file("f").read(at: 0, count: data.count), data))
        #expect(throws: FurcateError.self) { try s.recompress("nope", codec: .lz4) }
    }

    @Test func codecSpellings() throws {
        #expect(try Codec(parsing: "lz4:0") == .lz4)
        #expect(try Codec(parsing: "lz4:9") == .lz4hc(level: 9))
        #expect(try Codec(parsing: "zstd:19") == .zstd(level: 19))
        #expect(Codec.lz4hc(level: 9).description == "lz4:9")
        #expect(throws: FurcateError.self) { try Codec(parsing: "lz4:13") }
    }
}
