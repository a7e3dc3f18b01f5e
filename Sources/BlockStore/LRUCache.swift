import Synchronization

/// A bounded, sharded least-recently-used cache keyed by content id, shared by every file of a
/// store: decompressed blocks (so many forks faulting the same base blocks decompress them
/// once) and decoded tree nodes. Content ids never change meaning, so entries never go stale.
final class LRUCache<Value: Sendable>: Sendable {
    private final class Entry {
        let key: BlockID
        var value: Value
        var cost: Int
        // SAFETY: unowned(unsafe) links: `map` holds the only strong reference to every entry, and
        // an entry is unlinked before it leaves `map`, so a link never outlives its target. Strong
        // links would make freeing a long list recurse once per entry.
        unowned(unsafe) var prev: Entry?
        unowned(unsafe) var next: Entry?
        init(key: BlockID, value: Value, cost: Int) {
            self.key = key
            self.value = value
            self.cost = cost
        }
    }

    private struct Shard: ~Copyable {
        var map: [BlockID: Entry] = [:]
        var head: Entry?  // most recent
        var tail: Entry?  // least recent
        var cost = 0

        mutating func unlink(_ e: Entry) {
            if let p = e.prev { p.next = e.next } else { head = e.next }
            if let n = e.next { n.prev = e.prev } else { tail = e.prev }
            e.prev = nil
            e.next = nil
        }

        mutating func pushFront(_ e: Entry) {
            e.next = head
            head?.prev = e
            head = e
            if tail == nil { tail = e }
        }
    }

    private final class Locked: Sendable {
        let m = Mutex(Shard())
    }

    private let shards: [Locked]
    private let shardLimit: Int
    private let hits = Atomic<Int>(0)
    private let misses = Atomic<Int>(0)

    /// - Parameter capacity: total cost (bytes) kept across all shards.
    init(capacity: Int, shardCount: Int = 16) {
        shards = (0..<shardCount).map { _ in Locked() }
        shardLimit = max(1, capacity / shardCount)
    }

    @inline(__always) private func shard(_ key: BlockID) -> Int { Int(key.w1 % UInt64(shards.count)) }

    func get(_ key: BlockID) -> Value? {
        let v: Value? = shards[shard(key)].m.withLock { s in
            guard let e = s.map[key] else { return nil }
            s.unlink(e)
            s.pushFront(e)
            return e.value
        }
        if v == nil { misses.add(1, ordering: .relaxed) } else { hits.add(1, ordering: .relaxed) }
        return v
    }

    func put(_ key: BlockID, _ value: Value, cost: Int) {
        guard cost <= shardLimit else { return }
        shards[shard(key)].m.withLock { s in
            if let e = s.map[key] {
                s.cost += cost - e.cost
                e.value = value
                e.cost = cost
                s.unlink(e)
                s.pushFront(e)
            } else {
                let e = Entry(key: key, value: value, cost: cost)
                s.map[key] = e
                s.pushFront(e)
                s.cost += cost
            }
            while s.cost > shardLimit, let t = s.tail {
                s.unlink(t)
                s.map[t.key] = nil
                s.cost -= t.cost
            }
        }
    }

    func remove(_ key: BlockID) {
        shards[shard(key)].m.withLock { s in
            if let e = s.map[key] {
                s.unlink(e)
                s.map[key] = nil
                s.cost -= e.cost
            }
        }
    }

    func removeAll() {
        for sh in shards {
            sh.m.withLock { s in
                s.map.removeAll()
                s.head = nil
                s.tail = nil
                s.cost = 0
            }
        }
    }

    /// (hits, misses) since creation.
    var counters: (hits: Int, misses: Int) { (hits.load(ordering: .relaxed), misses.load(ordering: .relaxed)) }
}
