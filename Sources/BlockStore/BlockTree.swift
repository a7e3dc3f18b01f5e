import FurcateCore

/// One node of a file's block tree: 256 slots, each a child node id (inner levels) or a block
/// entry (level 0). Immutable and shared: a clone shares every node with its source.
final class TreeNode: Sendable {
    static let fanout = 256
    let level: Int
    let slots: [BlockID]

    init(level: Int, slots: [BlockID]) {
        self.level = level
        self.slots = slots
    }

    /// Node encoding, version 1: `version u8 | level u8 | count u16 LE | count × (slot u8, id 32 bytes)`,
    /// listing only non-hole slots in ascending order. The node's id is the SHA-256 of this encoding.
    func encode() -> [UInt8] {
        var out: [UInt8] = [1, UInt8(level), 0, 0]
        var count = 0
        for (i, s) in slots.enumerated() where !s.isHole {
            out.append(UInt8(i))
            out.append(contentsOf: s.bytes)
            count += 1
        }
        out[2] = UInt8(count & 0xff)
        out[3] = UInt8(count >> 8)
        return out
    }

    /// Decodes and checks a node encoding; `nil` when it is malformed.
    static func decode(_ data: UnsafeRawBufferPointer) -> TreeNode? {
        guard data.count >= 4, data[0] == 1, data[1] < UInt8(BlockTree.depth) else { return nil }
        let count = Int(data[2]) | Int(data[3]) << 8
        guard count <= fanout, data.count == 4 + count * 33 else { return nil }
        var slots = [BlockID](repeating: .hole, count: fanout)
        var last = -1
        for k in 0..<count {
            let base = 4 + k * 33
            let slot = Int(data[base])
            guard slot > last else { return nil }
            last = slot
            let id = BlockID(bytes: UnsafeRawBufferPointer(rebasing: data[(base + 1)..<(base + 33)]))
            guard !id.isHole else { return nil }
            slots[slot] = id
        }
        return TreeNode(level: Int(data[1]), slots: slots)
    }
}

/// Operations on persistent radix trees of block entries.
///
/// A file's block map is a tree of fixed depth 4 and fanout 256, addressed by block index
/// (so up to 2^32 blocks: 16 TiB at 4 KiB blocks). Nodes are content-addressed and never
/// modified; an update writes new copies of the nodes on the paths it touches and returns a new
/// root. A clone therefore copies one root id (O(1)), every read walks exactly 4 nodes whatever
/// the clone depth, and a clone costs memory and disk only for the paths it rewrote. An empty
/// subtree is the `hole` id, so sparse files hold no nodes for their holes.
struct BlockTree {
    static let depth = 4
    static let maxBlocks: UInt64 = 1 << 32

    /// Loads a node by id (from a cache or the index), checking it.
    let load: (BlockID) throws -> TreeNode

    /// Number of block indices one node at `level` covers.
    @inline(__always) static func span(_ level: Int) -> UInt64 { 1 << (8 * UInt64(level + 1)) }

    /// The entry of block `index` (`hole` when none).
    func lookup(_ root: BlockID, _ index: UInt64) throws -> BlockID {
        var id = root
        var level = Self.depth - 1
        while !id.isHole {
            let node = try load(id)
            let slot = Int((index >> (8 * UInt64(level))) & 0xff)
            id = node.slots[slot]
            if level == 0 { return id }
            level -= 1
        }
        return .hole
    }

    /// Nodes made by one `apply`: later steps of the same apply read them before they are stored.
    struct Batch {
        var created: [(BlockID, [UInt8])] = []
        var fresh: [BlockID: TreeNode] = [:]
    }

    /// A changed tree: clears applied first (block ranges made holes), then `sets` (sorted by index).
    /// New nodes are appended to `created` as (id, encoding).
    func apply(
        _ root: BlockID, clears: [Range<UInt64>], sets: [(UInt64, BlockID)],
        created: inout [(BlockID, [UInt8])]
    ) throws -> BlockID {
        var batch = Batch()
        var r = root
        for c in clears where !c.isEmpty {
            r = try clear(r, level: Self.depth - 1, base: 0, c, &batch)
        }
        if !sets.isEmpty {
            r = try set(r, level: Self.depth - 1, base: 0, sets[...], &batch)
        }
        created.append(contentsOf: batch.created)
        return r
    }

    private func slots(_ id: BlockID, _ batch: Batch) throws -> [BlockID] {
        if id.isHole { return [BlockID](repeating: .hole, count: TreeNode.fanout) }
        if let n = batch.fresh[id] { return n.slots }
        return try load(id).slots
    }

    private func make(_ slots: [BlockID], level: Int, _ batch: inout Batch) -> BlockID {
        if slots.allSatisfy(\.isHole) { return .hole }
        let node = TreeNode(level: level, slots: slots)
        let enc = node.encode()
        let id = enc.withUnsafeBytes { BlockID.hash($0) }
        if batch.fresh.updateValue(node, forKey: id) == nil { batch.created.append((id, enc)) }
        return id
    }

    private func clear(
        _ id: BlockID, level: Int, base: UInt64, _ r: Range<UInt64>, _ batch: inout Batch
    ) throws -> BlockID {
        if id.isHole { return id }
        let end = base + Self.span(level)
        if r.upperBound <= base || r.lowerBound >= end { return id }
        if r.lowerBound <= base && r.upperBound >= end { return .hole }
        var slots = try slots(id, batch)
        if level == 0 {
            let lo = Int(max(r.lowerBound, base) - base)
            let hi = Int(min(r.upperBound, end) - base)
            for s in lo..<hi { slots[s] = .hole }
        } else {
            let child = Self.span(level - 1)
            let lo = Int((max(r.lowerBound, base) - base) / child)
            let hi = Int((min(r.upperBound, end) - base - 1) / child)
            for s in lo...hi {
                slots[s] = try clear(slots[s], level: level - 1, base: base + UInt64(s) * child, r, &batch)
            }
        }
        return make(slots, level: level, &batch)
    }

    private func set(
        _ id: BlockID, level: Int, base: UInt64, _ sets: ArraySlice<(UInt64, BlockID)>, _ batch: inout Batch
    ) throws -> BlockID {
        var slots = try slots(id, batch)
        if level == 0 {
            for (i, e) in sets { slots[Int(i - base)] = e }
        } else {
            let child = Self.span(level - 1)
            var start = sets.startIndex
            while start < sets.endIndex {
                let s = Int((sets[start].0 - base) / child)
                let childEnd = base + UInt64(s + 1) * child
                var end = start + 1
                while end < sets.endIndex && sets[end].0 < childEnd { end += 1 }
                slots[s] = try set(
                    slots[s], level: level - 1, base: base + UInt64(s) * child, sets[start..<end], &batch)
                start = end
            }
        }
        return make(slots, level: level, &batch)
    }

    /// The first index ≥ `from` whose entry is not a hole, or nil.
    func nextAllocated(_ root: BlockID, from: UInt64) throws -> UInt64? {
        try nextAllocated(root, level: Self.depth - 1, base: 0, from: from)
    }

    private func nextAllocated(_ id: BlockID, level: Int, base: UInt64, from: UInt64) throws -> UInt64? {
        if id.isHole || from >= base + Self.span(level) { return nil }
        let node = try load(id)
        let child = level == 0 ? 1 : Self.span(level - 1)
        let first = from > base ? Int((from - base) / child) : 0
        for s in first..<TreeNode.fanout where !node.slots[s].isHole {
            let cb = base + UInt64(s) * child
            if level == 0 { return cb }
            if let r = try nextAllocated(node.slots[s], level: level - 1, base: cb, from: max(from, cb)) { return r }
        }
        return nil
    }

    /// The first index ≥ `from` whose entry is a hole (`maxBlocks` when every later index is allocated).
    func nextHole(_ root: BlockID, from: UInt64) throws -> UInt64 {
        try nextHole(root, level: Self.depth - 1, base: 0, from: from) ?? Self.maxBlocks
    }

    private func nextHole(_ id: BlockID, level: Int, base: UInt64, from: UInt64) throws -> UInt64? {
        if from >= base + Self.span(level) { return nil }
        if id.isHole { return max(from, base) }
        let node = try load(id)
        let child = level == 0 ? 1 : Self.span(level - 1)
        let first = from > base ? Int((from - base) / child) : 0
        for s in first..<TreeNode.fanout {
            let cb = base + UInt64(s) * child
            if node.slots[s].isHole { return max(from, cb) }
            if level > 0, let r = try nextHole(node.slots[s], level: level - 1, base: cb, from: max(from, cb)) {
                return r
            }
        }
        return nil
    }

    /// Visits every node reachable from `root` once per call of `enter` returning true: `enter`
    /// sees each node id before its children and returns false to skip a subtree already seen.
    /// `leaf` sees every level-0 entry with its block index.
    func walk(
        _ root: BlockID, enter: (BlockID) throws -> Bool, leaf: (UInt64, BlockID) throws -> Void
    ) throws {
        try walk(root, level: Self.depth - 1, base: 0, enter: enter, leaf: leaf)
    }

    private func walk(
        _ id: BlockID, level: Int, base: UInt64, enter: (BlockID) throws -> Bool,
        leaf: (UInt64, BlockID) throws -> Void
    ) throws {
        if id.isHole { return }
        guard try enter(id) else { return }
        let node = try load(id)
        let child = level == 0 ? 1 : Self.span(level - 1)
        for (s, e) in node.slots.enumerated() where !e.isHole {
            if level == 0 {
                try leaf(base + UInt64(s), e)
            } else {
                try walk(e, level: level - 1, base: base + UInt64(s) * child, enter: enter, leaf: leaf)
            }
        }
    }
}
