import Foundation
import FurcateCore
import FurcateTestSupport
import Testing

@Suite struct ByteSizeTests {
    @Test(
        arguments: [("4096", 4096), ("64K", 65536), ("64KiB", 65536), ("1m", 1 << 20), ("16G", 16 << 30), ("0", 0)]
            as [(String, UInt64)])
    func parses(_ text: String, _ value: UInt64) throws {
        #expect(try ByteSize.parse(text) == value)
    }

    @Test(arguments: ["", "K", "12Q", "-4", "99999999999999999999T"])
    func rejects(_ text: String) {
        #expect(throws: FurcateError.self) { try ByteSize.parse(text) }
    }

    @Test func formats() {
        #expect(ByteSize.format(512) == "512 B")
        #expect(ByteSize.format(65536) == "64 KiB")
        #expect(ByteSize.format(3 << 29) == "1.5 GiB")
    }
}

@Suite struct EntityNameTests {
    @Test(arguments: ["disk", "vm-1.mem", "a b", String(repeating: "x", count: 255)])
    func accepts(_ name: String) throws {
        try EntityName.validate(name)
    }

    @Test(arguments: ["", ".", "..", "a/b", "/abs", "nul\u{0}x", "tab\tx", String(repeating: "x", count: 256)])
    func rejects(_ name: String) {
        #expect {
            try EntityName.validate(name)
        } throws: { ($0 as? FurcateError)?.code == .invalidArgument }
    }
}

@Suite struct FurcateErrorTests {
    @Test func systemErrorsClassifyDiskFull() {
        let e = FurcateError.system("pwrite", errno: 28, path: "/x", offset: 7)  // ENOSPC
        #expect(e.code == .diskFull)
        #expect(e.description.contains("/x"))
        #expect(e.description.contains("offset 7"))
        #expect(e.posixErrno == 28)
    }
}

@Suite(.ownThread) struct ProcessStartTests {
    /// Started from a Swift concurrency thread (which blocks nearly every signal), a child still
    /// starts with no signal blocked: `terminate()` and `timeout` reach it.
    @Test func aChildStartsWithNoSignalBlocked() async throws {
        let mask = try await Task.detached {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/bin/grep")
            p.arguments = ["^SigBlk:", "/proc/self/status"]
            let out = Pipe()
            p.standardOutput = out
            try p.runWithSignalsUnblocked()
            let data = out.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            return String(decoding: data, as: UTF8.self)
        }.value
        #expect(
            mask.hasPrefix("SigBlk:")
                && mask.split(separator: "\t").last?.trimmingCharacters(in: .whitespacesAndNewlines).allSatisfy {
                    $0 == "0"
                } == true, "\(mask)")
    }
}

/// The guest artifacts belong to the installation, not to a data directory.
@Suite struct DataLayoutTests {
    @Test func guestArtifactsAreFoundNextToTheExecutable() {
        #expect(DataLayout.installedGuest(executable: "/usr/local/bin/furcate") == "/usr/local/share/furcate/guest")
        #expect(DataLayout.installedGuest(executable: "/tmp/p/bin/furcate") == "/tmp/p/share/furcate/guest")
        #expect(DataLayout.installedGuest(executable: "/src/furcate/.build/release/furcate") == nil)
    }
}
