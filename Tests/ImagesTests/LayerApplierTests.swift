import CSysXattr
import Foundation
import FurcateCore
import FurcateTestSupport
import Testing

@testable import Images

#if canImport(Glibc)
    import Glibc
#endif

/// Layers applied to a directory: whiteouts, opaque directories, links, ownership, refusal of
/// path traversal, symlinks that would lead outside the root.
@Suite(.ownThread) struct LayerApplierTests {
    /// Applies layers (written to files) to a fresh root; returns the root's TempDir.
    func apply(_ layers: [TestImage.Layer]) throws -> TempDir {
        let t = TempDir("apply")
        try FileManager.default.createDirectory(atPath: t.sub("root"), withIntermediateDirectories: true)
        let a = LayerApplier(root: t.sub("root"))
        for (i, l) in layers.enumerated() {
            let p = t.sub("layer\(i)")
            try Data(l.blob).write(to: URL(fileURLWithPath: p))
            try a.apply(layerAt: p, diffID: l.diffID, what: "layer \(i)")
        }
        a.finish()
        return t
    }

    @Test func whiteoutsOpaqueDirectoriesAndHardLinks() throws {
        let work = TempDir("src")
        try TestImage.busyboxBase(work.sub("base"))
        let top = work.sub("top")
        try writeFile(top + "/etc/.wh.removed.txt", "")
        try writeFile(top + "/opt/old/.wh..wh..opq", "")
        try writeFile(top + "/opt/old/b.txt", "upper\n")
        try writeFile(top + "/data/hello", "hi\n", mode: 0o4755)
        try sh(["ln", top + "/data/hello", top + "/data/hello-link"])
        try sh(["chown", "1234:2345", top + "/data/hello"])
        try sh(["chmod", "4755", top + "/data/hello"])
        let t = try apply([
            try TestImage.layer(from: work.sub("base")), try TestImage.layer(from: top, tarArgs: ["--owner=0", "."]),
        ])
        let r = t.sub("root")
        #expect(access(r + "/etc/removed.txt", F_OK) != 0, "whiteout should delete the lower layer's file")
        #expect(access(r + "/etc/.wh.removed.txt", F_OK) != 0, "whiteout markers are not files of the image")
        #expect(try String(contentsOfFile: r + "/etc/kept.txt", encoding: .utf8) == "kept\n")
        #expect(access(r + "/opt/old/a.txt", F_OK) != 0, "an opaque directory hides lower entries")
        #expect(try String(contentsOfFile: r + "/opt/old/b.txt", encoding: .utf8) == "upper\n")
        var a = stat(), b = stat()
        #expect(stat(r + "/data/hello", &a) == 0 && stat(r + "/data/hello-link", &b) == 0)
        #expect(a.st_ino == b.st_ino && a.st_nlink == 2, "the hard link shares the inode")
        #expect(a.st_mode & 0o7777 == 0o4755, "mode kept, set-uid included")
        var l = stat()
        #expect(lstat(r + "/bin/sh", &l) == 0 && l.st_mode & S_IFMT == S_IFLNK)
        #expect(a.st_mtim.tv_sec == 1_700_000_000)
    }

    @Test(.enabled(if: geteuid() == 0, "device nodes need root")) func devicesFifosAndXattrs() throws {
        let src = TempDir("dev")
        try FileManager.default.createDirectory(atPath: src.sub("dev"), withIntermediateDirectories: true)
        try sh(["mknod", src.sub("dev/null2"), "c", "1", "3"])
        try sh(["mknod", src.sub("dev/loop9"), "b", "7", "9"])
        try sh(["mkfifo", src.sub("dev/fifo")])
        try writeFile(src.sub("bin/ping"), "binary")
        let v = Array("furcate".utf8)
        #expect(v.withUnsafeBytes { setxattr(src.sub("bin/ping"), "user.furcate", $0.baseAddress, $0.count, 0) } == 0)
        let layer = try TestImage.layer(from: src.path, tarArgs: ["--xattrs", "--xattrs-include=*", "."])
        let t = try apply([layer])
        var st = stat()
        #expect(
            lstat(t.sub("root/dev/null2"), &st) == 0 && st.st_mode & S_IFMT == S_IFCHR
                && st.st_rdev == LayerApplier.makedev(1, 3))
        #expect(
            lstat(t.sub("root/dev/loop9"), &st) == 0 && st.st_mode & S_IFMT == S_IFBLK
                && st.st_rdev == LayerApplier.makedev(7, 9))
        #expect(lstat(t.sub("root/dev/fifo"), &st) == 0 && st.st_mode & S_IFMT == S_IFIFO)
        var buf = [UInt8](repeating: 0, count: 64)
        let n = buf.withUnsafeMutableBytes {
            getxattr(t.sub("root/bin/ping"), "user.furcate", $0.baseAddress, $0.count)
        }
        #expect(n == v.count && Array(buf.prefix(max(n, 0))) == v, "the pax SCHILY.xattr record was applied")
    }

    @Test func ownershipIsKept() throws {
        let src = TempDir("own")
        try writeFile(src.sub("d/f"), "x")
        try sh(["chown", "-R", "1000:1001", src.sub("d")])
        let layer = try TestImage.layer(from: src.path, tarArgs: ["--owner=1000", "--group=1001", "."])
        let t = try apply([layer])
        var st = stat()
        #expect(stat(t.sub("root/d/f"), &st) == 0 && st.st_uid == 1000 && st.st_gid == 1001)
    }

    @Test func dotDotEntriesAreRefused() throws {
        let src = TempDir("evil")
        try writeFile(src.sub("inner/placeholder"), "")
        try writeFile(src.sub("escaped.txt"), "outside\n")
        // -P keeps the leading ../ in the member name.
        let tmp = TempDir("evtar")
        try sh(["tar", "-C", src.sub("inner"), "-P", "-cf", tmp.sub("l.tar"), "../escaped.txt"])
        let raw = try bytes(tmp.sub("l.tar"))
        #expect(try sh(["tar", "-tPf", tmp.sub("l.tar")]).contains("../escaped.txt"))
        let e = #expect(throws: FurcateError.self) {
            try self.apply([TestImage.Layer(blob: raw, diffID: Digest(of: raw))])
        }
        #expect(e?.code == .invalidArgument)
        #expect(e?.message.contains("path traversal") == true)
    }

    @Test func symlinksCannotLeadOutOfTheRoot() throws {
        let outside = TempDir("outside")
        let src1 = TempDir("s1")
        try FileManager.default.createSymbolicLink(atPath: src1.sub("escape"), withDestinationPath: outside.path)
        try FileManager.default.createSymbolicLink(atPath: src1.sub("up"), withDestinationPath: "../../../..")
        let src2 = TempDir("s2")
        try writeFile(src2.sub("escape/planted"), "x")
        try writeFile(src2.sub("up/planted2"), "y")
        // Only the files: a directory entry for escape/ would (rightly) replace the symlink.
        let files = try TestImage.layer(from: src2.path, tarArgs: ["--no-recursion", "escape/planted", "up/planted2"])
        let t = try apply([try TestImage.layer(from: src1.path), files])
        #expect(access(outside.sub("planted"), F_OK) != 0, "nothing may be written through a symlink to the host")
        #expect(
            access(t.sub("root") + outside.path + "/planted", F_OK) == 0, "an absolute symlink resolves inside the root"
        )
        #expect(access(t.sub("root/planted2"), F_OK) == 0, "../ beyond the root stays at the root")
    }

    @Test func aLayerThatDoesNotMatchItsDiffIDIsRefused() throws {
        let src = TempDir("m")
        try writeFile(src.sub("f"), "x")
        var l = try TestImage.layer(from: src.path)
        l.diffID = Digest(of: [1, 2, 3])
        let e = #expect(throws: FurcateError.self) { try self.apply([l]) }
        #expect(e?.code == .damaged)
    }

    @Test func zstdAndUncompressedLayers() throws {
        let src = TempDir("z")
        try writeFile(src.sub("zz/file"), "zstd layer\n")
        let plain = try TestImage.layer(from: src.path, compress: false)
        let tmp = TempDir("zt")
        try Data(plain.blob).write(to: URL(fileURLWithPath: tmp.sub("l.tar")))
        try sh(["zstd", "-q", tmp.sub("l.tar"), "-o", tmp.sub("l.tar.zst")])
        let z = TestImage.Layer(blob: try bytes(tmp.sub("l.tar.zst")), diffID: plain.diffID)
        let t = try apply([z])
        #expect(try String(contentsOfFile: t.sub("root/zz/file"), encoding: .utf8) == "zstd layer\n")
        let t2 = try apply([plain])
        #expect(try String(contentsOfFile: t2.sub("root/zz/file"), encoding: .utf8) == "zstd layer\n")
    }

    @Test func aTruncatedLayerIsDamaged() throws {
        let src = TempDir("tr")
        try writeFile(src.sub("big"), String(repeating: "abcdefgh", count: 100_000))
        let l = try TestImage.layer(from: src.path)
        let cut = TestImage.Layer(blob: Array(l.blob.prefix(l.blob.count / 2)), diffID: l.diffID)
        let e = #expect(throws: FurcateError.self) { try self.apply([cut]) }
        #expect(e?.code == .damaged)
    }
}
