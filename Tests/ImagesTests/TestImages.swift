import Foundation
import FurcateCore
import FurcateTestSupport
import Images
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Runs a program to completion; throws with its output when it fails.
@discardableResult
func sh(_ args: [String], env: [String: String]? = nil) throws -> String {
    let r = try runCommand(args, env: env)
    guard r.status == 0 else {
        throw FurcateError(.io, "\(args.joined(separator: " ")) failed (\(r.status)): \(r.output.suffix(800))")
    }
    return r.output
}

func writeFile(_ path: String, _ s: String, mode: Int = 0o644) throws {
    try FileManager.default.createDirectory(
        atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
    try Data(s.utf8).write(to: URL(fileURLWithPath: path))
    chmod(path, mode_t(mode))
}

func bytes(_ path: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }

/// Layers and OCI layouts made by hand (GNU tar, gzip), so tests control every byte: whiteouts
/// are files named `.wh.NAME` in a layer directory; hard links are `ln`.
enum TestImage {
    struct Layer {
        var blob: [UInt8]
        var diffID: Digest
    }

    /// Tars `dir` (root-owned, sorted, fixed mtime) and gzips it unless `compress` is false.
    static func layer(from dir: String, compress: Bool = true, tarArgs: [String] = ["."]) throws -> Layer {
        let tmp = TempDir("layer")
        let tar = tmp.sub("l.tar")
        try sh(
            [
                "tar", "--numeric-owner", "--owner=0", "--group=0", "--sort=name", "--mtime=@1700000000", "-C", dir,
                "-cf", tar,
            ] + tarArgs)
        let raw = try bytes(tar)
        if !compress { return Layer(blob: raw, diffID: Digest(of: raw)) }
        try sh(["gzip", "-n", "-k", tar])
        return Layer(blob: try bytes(tar + ".gz"), diffID: Digest(of: raw))
    }

    /// A busybox base: /bin/busybox with a few applet links, /etc files.
    static func busyboxBase(_ dir: String) throws {
        let bb =
            ["/bin/busybox", "/usr/bin/busybox"].first { FileManager.default.isExecutableFile(atPath: $0) }
            ?? "/bin/busybox"
        try FileManager.default.createDirectory(atPath: dir + "/bin", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: bb, toPath: dir + "/bin/busybox")
        for a in ["sh", "ls", "cat", "echo", "stat", "test", "pwd", "id", "wget"] {
            try FileManager.default.createSymbolicLink(atPath: dir + "/bin/" + a, withDestinationPath: "busybox")
        }
        try writeFile(dir + "/etc/removed.txt", "this file is deleted by the second layer\n")
        try writeFile(dir + "/etc/kept.txt", "kept\n")
        try writeFile(
            dir + "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
        try writeFile(dir + "/etc/group", "root:x:0:\nnogroup:x:65534:\n")
        try writeFile(dir + "/opt/old/a.txt", "lower layer\n")
    }

    /// Writes an OCI layout at `dir` holding one image tagged `tag`. Returns its manifest digest.
    @discardableResult
    static func layout(_ dir: String, tag: String, layers: [Layer], env: [String], workingDir: String? = nil) throws
        -> Digest
    {
        var config = ImageConfig(env: env, workingDir: workingDir, cmd: ["/bin/sh"])
        config.workingDir = workingDir
        return try OCILayoutWriter.write(
            dir, tag: tag, layers: layers.map { OCILayoutWriter.Layer(blob: $0.blob, diffID: $0.diffID) },
            config: config)
    }

    /// The two-layer test image: busybox base; then /etc/removed.txt whited out, /opt/old made
    /// opaque (its a.txt gone, b.txt new), /data/hello with a hard link /data/hello-link.
    @discardableResult
    static func twoLayerLayout(_ dir: String, tag: String = "1") throws -> Digest {
        let work = TempDir("img")
        let base = work.sub("base")
        try busyboxBase(base)
        let top = work.sub("top")
        try writeFile(top + "/etc/.wh.removed.txt", "")
        try writeFile(top + "/opt/old/.wh..wh..opq", "")
        try writeFile(top + "/opt/old/b.txt", "upper layer\n")
        try writeFile(top + "/data/hello", "hello from layer two\n")
        try sh(["ln", top + "/data/hello", top + "/data/hello-link"])
        return try layout(
            dir, tag: tag, layers: [try layer(from: base), try layer(from: top)],
            env: ["PATH=/bin", "FURCATE_IMAGE_ENV=from-the-image"], workingDir: "/data")
    }
}
