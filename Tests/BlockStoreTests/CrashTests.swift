import Foundation
import FurcateCore
import FurcateTestSupport
import Testing

@testable import BlockStore

#if canImport(Glibc)
    import Glibc
#endif

/// SIGKILLs a writer process at random moments; every state it reported durable must survive.
@Suite(.serialized, .ownThread) struct CrashTests {
    static let rounds = Int(ProcessInfo.processInfo.environment["FURCATE_CRASH_ROUNDS"] ?? "") ?? 50

    /// Opens the store once the killed writer's lock is gone. Seen once in CI with other suites
    /// spawning processes in parallel: the open right after the writer was reaped still found
    /// its flock; the kernel released it moments later. Waits up to 5 s, then fails as before.
    static func openAfterKill(_ path: String) throws -> BlockStore {
        // Seen twice under parallel load (VM tests alongside): the killed writer's lock outlived
        // its reaping by seconds. Wait longer before calling it a failure.
        let deadline = Date().addingTimeInterval(30)
        while true {
            do {
                return try BlockStore.open(at: path)
            } catch let e as FurcateError where e.code == .busy && Date() < deadline {
                usleep(20_000)
            }
        }
    }

    @Test func killedWriterLosesNothingSynced() throws {
        let bin = furcateBinary
        try #require(FileManager.default.isExecutableFile(atPath: bin), "furcate binary not found beside the tests")
        var rng = SplitMix64(seed: UInt64(Date().timeIntervalSince1970))
        var verifiedPoints = 0
        for round in 0..<Self.rounds {
            let dir = TempDir("crash")
            let store = dir.sub("s")
            _ = try BlockStore.create(at: store, blockSize: CrashWorkload.blockSize)
            let seed = rng.next()
            let outPath = dir.sub("out")
            _ = FileManager.default.createFile(atPath: outPath, contents: nil)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: bin)
            p.arguments = ["store", "crash-writer", store, "--seed", "\(seed)"]
            p.standardOutput = FileHandle(forWritingAtPath: outPath)
            p.standardError = FileHandle.nullDevice
            try p.runWithSignalsUnblocked()
            // The kill lands after a random number of the writer's sync points (0 to 4: then in
            // the middle of the work after it), counted from what it reported, not after a
            // guessed time: a fresh-clone CI run on a loaded host killed writers 0-400 ms after
            // they were ready and found them at 12 sync points in 50 rounds.
            let target = Int(rng.next() % 5)
            let deadline = Date().addingTimeInterval(120)
            func reported() -> (ready: Bool, synced: Int) {
                let out = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
                return (out.contains("ready"), out.split(separator: "\n").filter { $0.hasPrefix("synced ") }.count)
            }
            while Date() < deadline, p.isRunning, !(reported().ready && reported().synced >= target) { usleep(2000) }
            usleep(useconds_t(rng.next() % 50_000))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let out = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
            try #require(out.contains("ready"), "round \(round): writer never got ready")
            let last =
                out.split(separator: "\n").compactMap { $0.hasPrefix("synced ") ? Int($0.dropFirst(7)) : nil }.last ?? 0

            // Replay the workload on the model up to sync point last + 1.
            var w = CrashWorkload(seed: seed)
            var model: [String: [UInt8]] = Dictionary(uniqueKeysWithValues: CrashWorkload.files.map { ($0, []) })
            var states: [Int: [String: [UInt8]]] = [0: model]
            var snapshots: [Int: String] = [:]
            while states[last + 1] == nil {
                let op = w.next()
                CrashWorkload.apply(op, to: &model)
                switch op {
                case .syncAll(let pt): states[pt] = model
                case .snapshot(_, let name, let pt):
                    states[pt] = model
                    snapshots[pt] = name
                default: break
                }
            }
            let s = try Self.openAfterKill(store)
            let report = try s.fsck()
            #expect(report.clean, "round \(round) seed \(seed): fsck \(report.problems) \(report.damage)")
            for name in CrashWorkload.files {
                let f = try s.file(name)
                let got = try f.read(at: 0, count: Int(f.size))
                let ok = got == states[last]![name]! || got == states[last + 1]![name]!
                #expect(
                    ok, "round \(round) seed \(seed): file \(name) matches neither sync point \(last) nor \(last + 1)")
            }
            for (pt, name) in snapshots where pt <= last {
                let got = try s.file(name).read(at: 0, count: 1 << 20)
                #expect(got == states[pt]![name]!, "round \(round) seed \(seed): snapshot \(name)")
            }
            verifiedPoints += last
            s.close()
        }
        // The kills must land after real work, or the test proves nothing.
        #expect(
            verifiedPoints > Self.rounds, "writers reached only \(verifiedPoints) sync points in \(Self.rounds) rounds")
    }
}
