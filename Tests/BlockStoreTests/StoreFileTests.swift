import Foundation
import FurcateCore
import FurcateTestSupport
import GRDB
import Testing

@testable import BlockStore

@Suite(.ownThread) struct StoreFileTests {
    @Test(arguments: [4096, 65536, 1 << 20])
    func readsBackWritesAtAnyOffsetAndLength(blockSize: Int) throws {
        let (tmp, s) = try makeStore(blockSize: blockSize)
        defer { withExtendedLifetime(tmp) {} }
        let f = try s.createFile("f")
        var model = [UInt8]()
        var rng = SplitMix64(seed: UInt64(blockSize))
        for round in 0..<60 {
            let off = Int(rng.next() % UInt64(blockSize * 6))
            let len = Int(rng.next() % UInt64(blockSize * 2)) + 1
            let data = pattern(len, seed: UInt64(round))
            try f.write(data, at: UInt64(off))
            if model.count < off + len { model += [UInt8](repeating: 0, count: off + len - model.count) }
            model.replaceSubrange(off..<(off + len), with: data)
            if round % 7 == 0 { try f.sync() }
            let r0 = Int(rng.next() % UInt64(model.count))
            let rl = Int(rng.next() % UInt64(blockSize * 3))
            #expect(try f.read(at: UInt64(r0), count: rl) == Array(model[r0..<min(model.count, r0 + rl)]))
        }
        #expect(f.size == UInt64(model.count))
        #expect(try f.read(at: 0, count: model.count + 10) == model)
    }

    @Test func holesReadAsZerosAndStayDistinctFromWrittenZeros() throws {
        let (tmp, s) = try makeStore(blockSize: 4096)
        defer { withExtendedLifetime(tmp) {} }
        let f = try s.createFile("f")
        try f.truncate(to: 10 * 4096)
        try f.write([UInt8](repeating: 0, count: 4096), at: 2 * 4096)  // written zeros
        try f.write([1, 2, 3], at: 5 * 4096 + 10)
        for synced in [false, true] {
            if synced { try f.sync() }
            #expect(try f.read(at: 0, count: 10 * 4096).allSatisfy { $0 == 0 } == false)
            #expect(try f.nextData(from: 0) == 2 * 4096)
            #expect(try f.nextHole(from: 2 * 4096) == 3 * 4096)
            #expect(try f.nextData(from: 3 * 4096) == 5 * 4096)
            #expect(try f.nextData(from: 5 * 4096 + 100) == 5 * 4096 + 100)
            #expect(try f.nextHole(from: 5 * 4096) == 6 * 4096)
            #expect(try f.nextData(from: 6 * 4096) == nil)
            #expect(try f.nextHole(from: 9 * 4096) == 9 * 4096)
        }
        // Written zeros are not stored: only the one data block is.
        #expect(try s.stats().blocks == 1)
    }

    @Test func truncateShrinkZeroesTheTailAndExtendAddsHoles() throws {
        let (tmp, s) = try makeStore(blockSize: 4096)
        defer { withExtendedLifetime(tmp) {} }
        let f = try s.createFile("f")
        try f.write([UInt8](repeating: 7, count: 20000), at: 0)
        try f.sync()
        try f.truncate(to: 5000)
        try f.truncate(to: 30000)
        var expect = [UInt8](repeating: 7, count: 5000) + [UInt8](repeating: 0, count: 25000)
        #expect(try f.read(at: 0, count: 30000) == expect)
        #expect(try f.nextData(from: 8192) == nil)
        try f.sync()
        #expect(try f.read(at: 0, count: 30000) == expect)
        try f.write([9], at: 29999)
        expect[29999] = 9
        #expect(try f.read(at: 0, count: 30000) == expect)
    }

    @Test func punchHoleDeallocatesWholeBlocksAndZeroesEdges() throws {
        let (tmp, s) = try makeStore(blockSize: 4096)
        defer { withExtendedLifetime(tmp) {} }
        let f = try s.createFile("f")
        try f.write([UInt8](repeating: 5, count: 8 * 4096), at: 0)
        try f.sync()
        try f.punchHole(offset: 1000, length: 4 * 4096)
        var expect = [UInt8](repeating: 5, count: 8 * 4096)
        for k in 1000..<(1000 + 4 * 4096) { expect[k] = 0 }
        #expect(try f.read(at: 0, count: 8 * 4096) == expect)
        #expect(f.size == 8 * 4096)
        #expect(try f.nextHole(from: 0) == 4096)
        #expect(try f.nextData(from: 4096) == 4 * 4096)
        try f.sync()
        #expect(try f.read(at: 0, count: 8 * 4096) == expect)
        #expect(try f.nextHole(from: 0) == 4096)
    }

    @Test func snapshotsAreImmutableAndClonesIndependent() throws {
        let (tmp, s) = try makeStore()
        defer { withExtendedLifetime(tmp) {} }
        let f = try s.createFile("base")
        try f.write(pattern(50000, seed: 1), at: 0)
        let snap = try s.snapshot("base", as: "snap")
        let c = try s.clone("snap", to: "child")
        #expect {
            try snap.write([1], at: 0)
        } throws: { ($0 as? FurcateError)?.code == .notPermitted }
        #expect(throws: FurcateError.self) { try snap.truncate(to: 0) }
        try c.write([UInt8](repeating: 1, count: 100), at: 0)
        try f.write([UInt8](repeating: 2, count: 100), at: 200)
        #expect(try snap.read(at: 0, count: 50000) == pattern(50000, seed: 1))
        #expect(try c.read(at: 0, count: 100) == [UInt8](repeating: 1, count: 100))
        #expect(try c.read(at: 200, count: 100) == Array(pattern(50000, seed: 1)[200..<300]))
        #expect(try f.read(at: 0, count: 100) == Array(pattern(50000, seed: 1)[0..<100]))
        #expect(throws: FurcateError.self) { try s.clone("base", to: "child") }
        #expect(throws: FurcateError.self) { try s.clone("nope", to: "x") }
    }

    /// Clone and snapshot copy one root: they add no node and no block, whatever the file size.
    @Test func cloneCopiesNoNodesOrBlocks() throws {
        let (tmp, s) = try makeStore(blockSize: 4096)
        defer { withExtendedLifetime(tmp) {} }
        let f = try s.createFile("big")
        for k in 0..<600 { try f.write(pattern(4096, seed: UInt64(k)), at: UInt64(k) * 4096) }
        try f.sync()
        func counts() throws -> (Int, Int) {
            try s.index.read("t") { db in
                (
                    try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM nodes")!,
                    try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM blocks")!
                )
            }
        }
        let before = try counts()
        var name = "big"
        for k in 0..<20 {
            try s.clone(name, to: "c\(k)")
            name = "c\(k)"
        }
        try s.snapshot(name, as: "snap")
        #expect(try counts() == before)
        // A clone of a clone of … reads the same blocks by the same 4-level walk.
        #expect(try s.file("snap").read(at: 4096 * 599, count: 4096) == pattern(4096, seed: 599))
        // One write to the deepest clone adds one leaf path (4 nodes) and one block.
        try s.file(name).write([1], at: 0)
        try s.file(name).sync()
        let after = try counts()
        #expect(after.0 - before.0 == BlockTree.depth)
        #expect(after.1 - before.1 == 1)
    }

    @Test func identicalBlocksAreStoredOnce() throws {
        let (tmp, s) = try makeStore(blockSize: 4096)
        defer { withExtendedLifetime(tmp) {} }
        let block = pattern(4096, seed: 9)
        for n in ["x", "y"] {
            let f = try s.createFile(n)
            for k in 0..<10 { try f.write(block, at: UInt64(k) * 4096) }
            try f.sync()
        }
        let st = try s.stats()
        #expect(st.blocks == 1)
        #expect(st.referencedBytes == 20 * 4096)
        #expect(st.dedupRatio == 20)
    }

    @Test(arguments: ["none", "lz4", "zstd", "zstd:19"])
    func everyCodecRoundTrips(codec: String) throws {
        let (dir, s) = try makeStore(blockSize: 65536, codec: try Codec(parsing: codec))
        let data =
            pattern(300_000, seed: 3) + [UInt8]((0..<70000).map { UInt8(truncatingIfNeeded: $0 &* 2654435761 >> 13) })
        try s.createFile("f").write(data, at: 0)
        s.close()
        let s2 = try BlockStore.open(at: dir.sub("s"))
        #expect(try s2.file("f").read(at: 0, count: data.count) == data)
        let st = try s2.stats()
        if codec == "none" { #expect(st.compressionRatio <= 1.0) } else { #expect(st.compressionRatio > 1.5) }
    }

    @Test func rejectsBadInput() throws {
        let (tmp, s) = try makeStore()
        defer { withExtendedLifetime(tmp) {} }
        #expect(throws: FurcateError.self) { try s.createFile("a/b") }
        #expect(throws: FurcateError.self) { try s.createFile("x", blockSize: 3000) }
        #expect(throws: FurcateError.self) { try s.createFile("x", blockSize: 2 << 20) }
        #expect(throws: FurcateError.self) { try Codec(parsing: "zstd:99") }
        try s.createFile("x")
        #expect {
            try s.createFile("x")
        } throws: { ($0 as? FurcateError)?.code == .exists }
        #expect {
            try s.file("missing")
        } throws: { ($0 as? FurcateError)?.code == .notFound }
        let f = try s.file("x")
        #expect(throws: FurcateError.self) { try f.write([1], at: f.maxSize) }
    }

    @Test func holdsFilesUpToATebibyteAndBeyond() throws {
        let (tmp, s) = try makeStore(blockSize: 4096)
        defer { withExtendedLifetime(tmp) {} }
        let f = try s.createFile("huge")
        let tib: UInt64 = 1 << 40
        try f.truncate(to: 2 * tib)
        try f.write([1, 2, 3], at: 2 * tib - 3)
        try f.write([4], at: tib)
        try f.sync()
        #expect(try f.read(at: 2 * tib - 3, count: 3) == [1, 2, 3])
        #expect(try f.read(at: tib, count: 1) == [4])
        #expect(try f.nextData(from: 0) == tib)
        #expect(try f.nextHole(from: tib) == tib + 4096)
        #expect(try s.stats().nodes <= 2 * BlockTree.depth)
    }

    @Test func renameAndDelete() throws {
        let (tmp, s) = try makeStore()
        defer { withExtendedLifetime(tmp) {} }
        try s.createFile("a").write([1, 2], at: 0)
        try s.rename("a", to: "b")
        #expect(try s.file("b").read(at: 0, count: 2) == [1, 2])
        #expect(throws: FurcateError.self) { try s.file("a") }
        try s.delete("b")
        #expect(try s.list().isEmpty)
        #expect(throws: FurcateError.self) { try s.delete("b") }
    }
}

@Suite(.ownThread) struct PersistenceTests {
    @Test func syncedStateSurvivesReopen() throws {
        let dir = TempDir()
        let path = dir.sub("s")
        do {
            let s = try BlockStore.create(at: path, blockSize: 4096)
            let f = try s.createFile("f")
            try f.write(pattern(10000, seed: 1), at: 0)
            try f.sync()
            try s.snapshot("f", as: "snap")
            try f.truncate(to: 100)
            s.close()
        }
        let s = try BlockStore.open(at: path)
        #expect(try s.file("f").size == 100)
        #expect(try s.file("snap").read(at: 0, count: 10000) == pattern(10000, seed: 1))
        #expect(try s.fsck().clean)
    }

    @Test func secondOpenIsRefusedWithAClearError() throws {
        let (dir, s) = try makeStore()
        defer { withExtendedLifetime(s) {} }
        #expect {
            try BlockStore.open(at: dir.sub("s"))
        } throws: { e in
            let fe = e as? FurcateError
            return fe?.code == .busy && fe!.description.contains("in use")
        }
    }

    @Test func openingANonStoreSaysSo() throws {
        let dir = TempDir()
        #expect {
            try BlockStore.open(at: dir.path)
        } throws: { ($0 as? FurcateError)?.code == .notAStore }
        try Data("x".utf8).write(to: URL(fileURLWithPath: dir.sub("junk")))
        #expect {
            try BlockStore.create(at: dir.path)
        } throws: { ($0 as? FurcateError)?.code == .exists }
    }
}
