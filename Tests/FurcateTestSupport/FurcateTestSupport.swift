// Helpers shared by the test targets: temporary directories, the built `furcate` binary,
// fast byte comparison.
import CSpawn
import Foundation
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// A fresh temporary directory, removed when the value is dropped.
public final class TempDir {
    /// The directory's path.
    public let path: String
    /// Makes a directory `furcate-LABEL-XXXXXX` under the temporary directory.
    public init(_ label: String = "t") {
        var template = Array("\(NSTemporaryDirectory())/furcate-\(label)-XXXXXX".utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ $0.baseAddress.flatMap(mkdtemp) }) else {
            fatalError("mkdtemp failed: errno \(errno)")
        }
        path = String(cString: p)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    /// The path of `name` inside the directory.
    public func sub(_ name: String) -> String { path + "/" + name }
}

/// The `furcate` executable built beside the test bundle.
public var furcateBinary: String {
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

/// Byte equality by memcmp: debug builds compare arrays element by element, far slower, and a
/// failed `#expect(a == b)` would print both arrays whole.
public func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    a.count == b.count
        && (a.isEmpty
            || a.withUnsafeBytes { x in
                b.withUnsafeBytes { y in
                    x.baseAddress.flatMap { xp in y.baseAddress.map { memcmp(xp, $0, a.count) == 0 } } ?? false
                }
            })
}

/// Runs a program (looked up in PATH) to completion: its status and its stdout and stderr
/// together. `env` is added to this process's environment.
public func runCommand(_ args: [String], env: [String: String]? = nil) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    if let env { p.environment = ProcessInfo.processInfo.environment.merging(env) { $1 } }
    // A close-on-exec pipe, not Foundation's Pipe: a process another test starts meanwhile must
    // not inherit its write end, or the read below waits for that process's end too.
    var fds: [Int32] = [0, 0]
    guard cspawn_pipe_cloexec(&fds) == 0 else { throw FurcateError.system("pipe2", errno: errno) }
    let reader = FileHandle(fileDescriptor: fds[0], closeOnDealloc: true)
    let writer = FileHandle(fileDescriptor: fds[1], closeOnDealloc: true)
    p.standardOutput = writer
    p.standardError = writer
    do { try p.runWithSignalsUnblocked() } catch {
        try? writer.close()
        throw error
    }
    try writer.close()
    let data = reader.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// Whether tests that need a facility (root, FUSE, QEMU, a registry, …) run: yes when it is
/// there; when `unavailable` says why it is not, no — except in CI (`CI=true`, which `.ci/run`
/// sets), where every facility must be there: the tests run anyway and fail saying what broke.
public func facilityAvailable(_ what: String, unavailable: String?) -> Bool {
    guard let why = unavailable else { return true }
    if ProcessInfo.processInfo.environment["CI"] == "true" {
        print("CI: running \(what) although \(why): in CI they must not be skipped")
        return true
    }
    print("skipping \(what): \(why)")
    return false
}
