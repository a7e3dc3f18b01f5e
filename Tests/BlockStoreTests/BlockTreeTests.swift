import FurcateCore
import FurcateTestSupport
import Testing

@testable import BlockStore

/// The radix tree against a dictionary model, with nodes kept in memory.
@Suite(.ownThread) struct BlockTreeTests {
    final class Nodes: @unchecked Sendable {
        var map: [BlockID: TreeNode] = [:]
        var tree: BlockTree {
            BlockTree(load: { id in
                guard let n = self.map[id] else { throw FurcateError(.damaged, "missing node") }
                return n
            })
        }
        func add(_ created: [(BlockID, [UInt8])]) {
            for (id, enc) in created {
                guard let n = enc.withUnsafeBytes({ TreeNode.decode($0) }) else {
                    Issue.record("node \(id) does not decode")
                    continue
                }
                #expect(enc.withUnsafeBytes { BlockID.hash($0) } == id)
                map[id] = n
            }
        }
    }

    func id(_ k: UInt64) -> BlockID { BlockID(w0: k &+ 1, w1: 7, w2: 7, w3: 7) }

    @Test func randomUpdatesMatchModel() throws {
        let nodes = Nodes()
        var rng = SplitMix64(seed: 42)
        var model: [UInt64: BlockID] = [:]
        var root = BlockID.hole
        let space: [UInt64] = [0, 1, 255, 256, 65535, 65536, 1 << 24, (1 << 32) - 1]
        func randomIndex() -> UInt64 {
            rng.next() % 2 == 0 ? space[Int(rng.next() % UInt64(space.count))] + rng.next() % 3 : rng.next() % 5000
        }
        for round in 0..<200 {
            var sets: [UInt64: BlockID] = [:]
            for _ in 0..<Int(rng.next() % 20) {
                let i = min(randomIndex(), BlockTree.maxBlocks - 1)
                sets[i] = rng.next() % 5 == 0 ? .hole : (rng.next() % 7 == 0 ? .zero : id(UInt64(round) << 20 | i))
            }
            var clears: [Range<UInt64>] = []
            if rng.next() % 4 == 0 {
                let lo = min(randomIndex(), BlockTree.maxBlocks - 1)
                let hi = min(lo + rng.next() % 3000, BlockTree.maxBlocks)
                clears.append(lo..<hi)
                for k in model.keys where k >= lo && k < hi { model[k] = nil }
            }
            for (k, v) in sets { model[k] = v.isHole ? nil : v }
            var created: [(BlockID, [UInt8])] = []
            root = try nodes.tree.apply(
                root, clears: clears, sets: sets.sorted { $0.key < $1.key }.map { ($0.key, $0.value) },
                created: &created)
            nodes.add(created)
            for (k, v) in model { #expect(try nodes.tree.lookup(root, k) == v) }
            // Allocation walk agrees with the model.
            let sortedKeys = model.keys.sorted()
            var walked: [UInt64] = []
            try nodes.tree.walk(root, enter: { _ in true }, leaf: { i, _ in walked.append(i) })
            #expect(walked == sortedKeys)
            if let first = sortedKeys.first {
                #expect(try nodes.tree.nextAllocated(root, from: 0) == first)
                #expect(try nodes.tree.nextAllocated(root, from: first + 1) == sortedKeys.dropFirst().first)
                let hole = try nodes.tree.nextHole(root, from: first)
                var expect = first
                while model[expect] != nil { expect += 1 }
                #expect(hole == expect)
            } else {
                #expect(root.isHole)
            }
        }
    }

    @Test func emptyingATreePrunesToHole() throws {
        let nodes = Nodes()
        var created: [(BlockID, [UInt8])] = []
        let r = try nodes.tree.apply(.hole, clears: [], sets: [(5, id(1)), (70000, id(2))], created: &created)
        nodes.add(created)
        #expect(!r.isHole)
        created = []
        let r2 = try nodes.tree.apply(r, clears: [0..<BlockTree.maxBlocks], sets: [], created: &created)
        #expect(r2.isHole)
        #expect(created.isEmpty)
    }

    @Test func nodeDecodeRejectsGarbage() {
        #expect([UInt8]([1, 0, 1, 0]).withUnsafeBytes { TreeNode.decode($0) } == nil)  // count 1 without entry
        #expect([UInt8]([9, 0, 0, 0]).withUnsafeBytes { TreeNode.decode($0) } == nil)  // bad version
        #expect([UInt8]([1, 0, 0, 0]).withUnsafeBytes { TreeNode.decode($0) } != nil)
    }
}
