import Foundation
import FurcateCore
import Testing

@testable import BlockStore

#if canImport(Glibc)
import Glibc
#endif

/// A fresh temporary directory, removed when the value is dropped.
final class TempDir {
    let path: String
    init(_ label: String = "t") {
        var template = Array("\(NSTemporaryDirectory())/furcate-\(label)-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = String(cString: p!)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func sub(_ name: String) -> String { path + "/" + name }
}

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

/// The `furcate` executable built beside this test bundle.
var furcateBinary: String {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
    // The test bundle may be a directory (macOS) or a file (Linux) inside the bin path.
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("furcate").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    return "furcate"
}

struct RunResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs `furcate` with `args` and waits.
func runFurcate(_ args: [String]) throws -> RunResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: furcateBinary)
    p.arguments = args
    let out = Pipe()
    let err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return RunResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
}

/// Byte equality by memcmp: debug builds compare arrays element by element, far slower.
func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    a.count == b.count && (a.isEmpty || a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 } })
}
