import Foundation
import FurcateCore
import FurcateTestSupport
import GRDB
import Testing

@testable import BlockStore

@Suite(.ownThread) struct GCTests {
    @Test func freesOnlyWhatNothingReferences() throws {
        let (tmp, s) = try makeStore(blockSize: 4096)
        defer { withExtendedLifetime(tmp) {} }
        let a = try s.createFile("a")
        try a.write(pattern(40 * 4096, seed: 1), at: 0)
        try s.snapshot("a", as: "snap")
        try a.write(pattern(10 * 4096, seed: 2), at: 0)  // 10 new blocks; old ones kept by snap
        try a.sync()
        var r = try s.gc()
        #expect(r.blocksFreed == 0)
        try s.delete("snap")
        r = try s.gc()
        #expect(r.blocksFreed == 10)
        #expect(
            try s.file("a").read(at: 0, count: 40 * 4096) == pattern(10 * 4096, seed: 2)
                + Array(pattern(40 * 4096, seed: 1)[(10 * 4096)...]))
        #expect(try s.fsck().clean)
    }

    @Test func neverFreesBlocksOfUnsyncedWrites() throws {
        let (tmp, s) = try makeStore(blockSize: 4096) { $0.dirtyBudgetBytes = 0 }  // flush to packs at once
        defer { withExtendedLifetime(tmp) {} }
        let a = try s.createFile("a")
        try a.write(pattern(20 * 4096, seed: 5), at: 0)  // in packs, not indexed, not synced
        let b = try s.createFile("b")
        try b.write(pattern(4096, seed: 6), at: 0)
        try b.sync()
        try s.delete("b")  // b's block is garbage; a write of the same content is in flight below
        try a.write(pattern(4096, seed: 6), at: 0)  // dedups against b's indexed block
        _ = try s.gc()
        try a.sync()
        _ = try s.gc()
        var expect = pattern(20 * 4096, seed: 5)
        expect.replaceSubrange(0..<4096, with: pattern(4096, seed: 6))
        #expect(try a.read(at: 0, count: 20 * 4096) == expect)
        #expect(try s.fsck().clean)
    }

    @Test func compactsSparsePacksAndKeepsLiveData() throws {
        let (dir, s) = try makeStore(blockSize: 4096, codec: .none) { $0.packRolloverBytes = 64 << 10 }
        let f = try s.createFile("f")
        for k in 0..<100 { try f.write(pattern(4096, seed: UInt64(k)), at: UInt64(k) * 4096) }
        try f.sync()
        let packsBefore = try s.stats().packs
        #expect(packsBefore > 4)
        // Overwrite 3 of every 4 blocks with zeros: most of every pack becomes garbage.
        for k in 0..<100 where k % 4 != 0 { try f.write([UInt8](repeating: 0, count: 4096), at: UInt64(k) * 4096) }
        try f.sync()
        let r = try s.gc()
        #expect(r.blocksFreed == 75)
        #expect(r.packsCompacted + r.packsDeleted > 0)
        #expect(r.bytesReclaimedOnDisk > 0)
        let st = try s.stats()
        #expect(st.packBytes < UInt64(100 * 4096))
        for k in stride(from: 0, to: 100, by: 4) {
            #expect(try f.read(at: UInt64(k) * 4096, count: 4096) == pattern(4096, seed: UInt64(k)))
        }
        s.close()
        let s2 = try BlockStore.open(at: dir.sub("s"))
        #expect(try s2.fsck().clean)
        #expect(try s2.file("f").read(at: 4 * 4096, count: 4096) == pattern(4096, seed: 4))
    }

    @Test func concurrentWritersReadersAndGC() async throws {
        let (tmp, s) = try makeStore(blockSize: 4096) {
            $0.packRolloverBytes = 128 << 10; $0.blockCacheBytes = 64 << 10
        }
        defer { withExtendedLifetime(tmp) {} }
        let names = (0..<4).map { "f\($0)" }
        for n in names { try s.createFile(n) }
        try await withThrowingTaskGroup(of: Void.self) { g in
            for (w, n) in names.enumerated() {
                g.addTask {
                    let f = try s.file(n)
                    for round in 0..<30 {
                        let data = pattern(8 * 4096, seed: UInt64(w * 1000 + round))
                        try f.write(data, at: UInt64(round % 5) * 4096)
                        #expect(try f.read(at: UInt64(round % 5) * 4096, count: data.count) == data)
                        if round % 3 == 0 { try f.sync() }
                        if round % 10 == 9 {
                            try s.snapshot(n, as: "\(n)-s\(round)")
                            try s.delete("\(n)-s\(round)")
                        }
                    }
                }
            }
            g.addTask {
                for _ in 0..<10 { _ = try s.gc() }
            }
            try await g.waitForAll()
        }
        _ = try s.gc()
        let r = try s.fsck()
        #expect(r.clean)
        #expect(r.unreferencedBlocks == 0)
    }
}
