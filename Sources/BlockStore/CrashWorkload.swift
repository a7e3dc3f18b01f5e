/// A deterministic random workload for crash tests: `furcate store crash-writer` runs it
/// against a store and reports each completed sync point; the test replays the same seed on an
/// in-memory model to know what every file must hold after a SIGKILL at any moment.
public struct CrashWorkload: Sendable {
    /// One step of the workload.
    public enum Op: Sendable, Equatable {
        case write(file: String, offset: UInt64, bytes: [UInt8])
        case truncate(file: String, size: UInt64)
        case punch(file: String, offset: UInt64, length: UInt64)
        /// Sync every file: after it returns, sync point `point` is durable.
        case syncAll(point: Int)
        /// Snapshot `file` as `name` (durable on return), also a sync point.
        case snapshot(file: String, name: String, point: Int)
    }

    /// The files the workload writes.
    public static let files = ["a", "b", "c"]
    /// Their block size.
    public static let blockSize = 4096
    /// The largest size a file reaches.
    public static let maxSize: UInt64 = 512 << 10

    private var rng: SplitMix64
    private var point = 0
    private var sinceSync = 0

    /// The workload of `seed`: the same seed, the same steps.
    public init(seed: UInt64) { rng = SplitMix64(seed: seed) }

    /// The next step.
    public mutating func next() -> Op {
        sinceSync += 1
        if sinceSync >= 8 + Int(rng.next() % 8) {
            sinceSync = 0
            point += 1
            if rng.next() % 4 == 0 {
                let f = Self.files[Int(rng.next() % 3)]
                return .snapshot(file: f, name: "snap-\(point)", point: point)
            }
            return .syncAll(point: point)
        }
        let f = Self.files[Int(rng.next() % 3)]
        switch rng.next() % 10 {
        case 0:
            return .truncate(file: f, size: rng.next() % Self.maxSize)
        case 1:
            return .punch(file: f, offset: rng.next() % Self.maxSize, length: rng.next() % (64 << 10))
        default:
            let len = Int(1 + rng.next() % (48 << 10))
            let off = rng.next() % (Self.maxSize - UInt64(len))
            let fill = UInt8(truncatingIfNeeded: rng.next())
            var bytes = [UInt8](repeating: fill, count: len)
            // Some distinct bytes so blocks differ, some runs so they compress.
            for k in stride(from: 0, to: len, by: 97) { bytes[k] = UInt8(truncatingIfNeeded: rng.next()) }
            if rng.next() % 5 == 0 { bytes = [UInt8](repeating: 0, count: len) }
            return .write(file: f, offset: off, bytes: bytes)
        }
    }

    /// Applies `op` to a model: file name → contents.
    public static func apply(_ op: Op, to model: inout [String: [UInt8]]) {
        switch op {
        case .write(let f, let off, let bytes):
            var c = model[f] ?? []
            let end = Int(off) + bytes.count
            if c.count < end { c += [UInt8](repeating: 0, count: end - c.count) }
            c.replaceSubrange(Int(off)..<end, with: bytes)
            model[f] = c
        case .truncate(let f, let size):
            var c = model[f] ?? []
            if c.count > Int(size) {
                c.removeLast(c.count - Int(size))
            } else {
                c += [UInt8](repeating: 0, count: Int(size) - c.count)
            }
            model[f] = c
        case .punch(let f, let off, let len):
            var c = model[f] ?? []
            let lo = min(Int(off), c.count)
            let hi = min(Int(off + len), c.count)
            for k in lo..<hi { c[k] = 0 }
            model[f] = c
        case .syncAll:
            break
        case .snapshot(let f, let name, _):
            model[name] = model[f] ?? []
        }
    }
}

/// A small, fast, seedable PRNG (SplitMix64) for reproducible tests and benchmarks.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    /// A generator of `seed`.
    public init(seed: UInt64) { state = seed }
    /// The next number of the sequence.
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
