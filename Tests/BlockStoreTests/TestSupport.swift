import Foundation
import FurcateCore
import FurcateTestSupport
import Testing

@testable import BlockStore

#if canImport(Glibc)
    import Glibc
#endif

/// Creates a store in a new temp dir; the dir lives as long as the returned value.
func makeStore(
    blockSize: Int = 4096, codec: Codec = .lz4, configure: (inout StoreOptions) -> Void = { _ in }
) throws -> (TempDir, BlockStore) {
    let dir = TempDir("store")
    var o = StoreOptions()
    configure(&o)
    let s = try BlockStore.create(at: dir.sub("s"), blockSize: blockSize, codec: codec, options: o)
    return (dir, s)
}

/// Bytes that compress somewhat and differ per (seed, index).
func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    var out = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
        let v = rng.next()
        let run = Int(v & 15) + 1
        let b = UInt8(truncatingIfNeeded: v >> 8)
        for k in i..<min(count, i + run) { out[k] = b }
        i += run
    }
    return out
}

struct RunResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs `furcate` with `args` and waits.
func runFurcate(_ args: [String], environment: [String: String] = [:]) throws -> RunResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: furcateBinary)
    p.arguments = args
    if !environment.isEmpty { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let out = Pipe()
    let err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.runWithSignalsUnblocked()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return RunResult(
        status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
        stderr: String(decoding: e, as: UTF8.self))
}
