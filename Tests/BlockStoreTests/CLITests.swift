import Foundation
import FurcateCore
import FurcateTestSupport
import Testing

@testable import BlockStore

#if canImport(Glibc)
    import Glibc
#endif

/// The `furcate store` contract: exit status and one line on stderr that says what and where.
@Suite(.ownThread) struct CLITests {
    @Test func roundTripKeepsHolesAndContents() throws {
        let dir = TempDir("cli")
        let store = dir.sub("s")
        let src = dir.sub("src.img")
        let dst = dir.sub("dst.img")
        // 8 MiB sparse file with data at 1 MiB and 6 MiB.
        let fd = open(src, O_RDWR | O_CREAT, 0o644)
        ftruncate(fd, 8 << 20)
        let a = pattern(300_000, seed: 1)
        let b = pattern(5000, seed: 2)
        _ = a.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 1 << 20) }
        _ = b.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 6 << 20) }
        close(fd)

        #expect(try runFurcate(["store", "init", store, "--block-size", "64K", "--codec", "zstd:3"]).status == 0)
        let put = try runFurcate(["store", "put", store, "disk", src])
        #expect(put.status == 0, "\(put.stderr)")
        #expect(try runFurcate(["store", "clone", store, "disk", "disk2"]).status == 0)
        #expect(try runFurcate(["store", "snapshot", store, "disk2", "snap"]).status == 0)
        let get = try runFurcate(["store", "get", store, "snap", dst])
        #expect(get.status == 0, "\(get.stderr)")
        #expect(FileManager.default.contentsEqual(atPath: src, andPath: dst))
        var st = stat()
        stat(dst, &st)
        #expect(st.st_size == 8 << 20)
        #expect(Int(st.st_blocks) * 512 < 1 << 20, "export is not sparse: \(st.st_blocks) blocks")

        let ls = try runFurcate(["store", "ls", store, "--json"])
        let items = try JSONDecoder().decode([FileInfo].self, from: Data(ls.stdout.utf8))
        #expect(items.map(\.name) == ["disk", "disk2", "snap"])
        #expect(items.last?.kind == .snapshot)
        let stats = try runFurcate(["store", "stats", store, "--json"])
        let s = try JSONDecoder().decode(StoreStats.self, from: Data(stats.stdout.utf8))
        #expect(s.logicalBytes == 3 * (8 << 20))
        #expect(s.dedupRatio == 3)
        #expect(try runFurcate(["store", "rm", store, "disk"]).status == 0)
        #expect(try runFurcate(["store", "gc", store, "--json"]).status == 0)
        let fsck = try runFurcate(["store", "fsck", store, "--json"])
        #expect(fsck.status == 0)
        #expect(try JSONDecoder().decode(FsckReport.self, from: Data(fsck.stdout.utf8)).clean)
    }

    @Test func errorsAreOneLineSayingWhatAndWhere() throws {
        let dir = TempDir("cli")
        let store = dir.sub("s")
        func fails(_ args: [String], _ needle: String) throws {
            let r = try runFurcate(args)
            #expect(r.status != 0, "\(args) should fail")
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.count == 1, "\(args): \(r.stderr)")
            #expect(r.stderr.contains(needle), "\(args): \(r.stderr)")
        }
        try fails(["store", "ls", store], "no store")
        #expect(try runFurcate(["store", "init", store]).status == 0)
        try fails(["store", "init", store], "exists")
        try fails(["store", "put", store, "a/b", "/etc/hostname"], "single path component")
        try fails(["store", "put", store, "x", dir.sub("nope")], dir.sub("nope"))
        #expect(try runFurcate(["store", "put", store, "x", "/etc/hostname"]).status == 0)
        try fails(["store", "put", store, "x", "/etc/hostname"], "exists")
        try fails(["store", "clone", store, "missing", "y"], "missing")
        try fails(["store", "rm", store, "missing"], "no file or snapshot named 'missing'")
        try fails(["store", "init", dir.sub("t"), "--block-size", "3K"], "power of two")
        try fails(["store", "init", dir.sub("t"), "--codec", "brotli"], "codec")
        try fails(["store", "get", store, "x", dir.sub("no/such/dir")], "no/such/dir")
    }
}

/// `furcate doctor` names every check, and fails (one line on stderr) on what stops serve.
@Suite(.ownThread) struct DoctorTests {
    struct Check: Decodable {
        var name: String
        var level: String
        var fix: String?
    }

    @Test func namesEveryCheckAndFailsOnMissingArtifacts() throws {
        let dir = TempDir("doctor")
        let r = try runFurcate(
            ["doctor", "--json", "--data", dir.sub("d")], environment: ["FURCATE_GUEST_DIR": dir.sub("none")])
        let checks = try JSONDecoder().decode([Check].self, from: Data(r.stdout.utf8))
        #expect(checks.map(\.name) == ["root", "accelerator", "fuse", "qemu", "guest artifacts", "disk", "cgroups"])
        let artifacts = checks.first { $0.name == "guest artifacts" }
        #expect(artifacts?.level == "fail" && artifacts?.fix?.contains("setup.sh") == true)
        #expect(r.status != 0 && r.stderr.contains("guest artifacts"), "\(r.stderr)")
        #expect(r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
    }
}
