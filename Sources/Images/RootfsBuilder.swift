import Foundation
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// Turns an unpacked image directory into an ext4 filesystem image (`mkfs.ext4 -d`), after
/// putting the guest agent and the image's configuration under `/.furcate`.
public enum RootfsBuilder {
    static let gib: UInt64 = 1 << 30

    /// Sizing: InstaVM's rule — an automatic size is at least `minimum` and at most `maximum`;
    /// an explicit size smaller than the content needs fails, naming the minimum.
    struct Sizing: Sendable {
        var explicitBytes: UInt64?
        var minimum: UInt64 = 3 << 30
        var maximum: UInt64 = 16 << 30
    }

    /// What the filesystem will hold: bytes in 4 KiB blocks and inodes.
    struct Content {
        var blockBytes: UInt64 = 0
        var inodes: UInt64 = 0
    }

    /// Adds Furcate's files to an unpacked rootfs: the agent, the image config and environment,
    /// and the mount points the initramfs and agent use.
    static func inject(root: String, agentPath: String?, config: ImageConfig) throws {
        let fm = FileManager.default
        for (d, mode) in [
            ("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("tmp", 0o1777), ("run", 0o755), ("root", 0o700),
            ("etc", 0o755),
        ] {
            var st = stat()
            if lstat(root + "/" + d, &st) != 0 {
                guard mkdir(root + "/" + d, mode_t(mode)) == 0 else {
                    throw FurcateError.system("mkdir", errno: errno, path: root + "/" + d)
                }
                chmod(root + "/" + d, mode_t(mode))
            }
        }
        let f = root + "/.furcate"
        if fm.fileExists(atPath: f) { try fm.removeItem(atPath: f) }  // an image cannot bring its own agent
        guard mkdir(f, 0o755) == 0 else { throw FurcateError.system("mkdir", errno: errno, path: f) }
        if let agentPath {
            do {
                try fm.copyItem(atPath: agentPath, toPath: f + "/agent")
            } catch {
                throw FurcateError(
                    .notFound, "cannot copy the guest agent from \(agentPath) (scripts/build-agent.sh builds it)",
                    underlying: UnderlyingMessage(error))
            }
            chmod(f + "/agent", 0o755)
        }
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(config).write(to: URL(fileURLWithPath: f + "/image.json"))
        // KEY=VALUE lines the agent adds to every process it starts.
        let env = (config.env ?? []).filter { $0.contains("=") && !$0.contains("\n") }.joined(separator: "\n")
        try Data((env.isEmpty ? "" : env + "\n").utf8).write(to: URL(fileURLWithPath: f + "/env"))
        // The directory exec starts in when a request names none (Docker's WorkingDir).
        if let w = config.workingDir, w.hasPrefix("/") {
            try Data((w + "\n").utf8).write(to: URL(fileURLWithPath: f + "/workdir"))
        }
    }

    /// Walks the tree without following symlinks.
    static func measure(_ root: String) throws -> Content {
        var c = Content()
        var seen = Set<UInt64>()  // hard-linked inodes count once
        func walk(_ p: String) throws {
            guard let dir = opendir(p) else { throw FurcateError.system("opendir", errno: errno, path: p) }
            defer { closedir(dir) }
            while let ent = readdir(dir) {
                let name = withUnsafePointer(to: ent.pointee.d_name) {
                    String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self))
                }
                if name == "." || name == ".." { continue }
                let child = p + "/" + name
                var st = stat()
                guard lstat(child, &st) == 0 else { continue }
                if st.st_nlink > 1 && st.st_mode & S_IFMT != S_IFDIR {
                    if !seen.insert(UInt64(st.st_ino)).inserted { continue }
                }
                c.inodes += 1
                switch st.st_mode & S_IFMT {
                case S_IFDIR:
                    c.blockBytes += 4096
                    try walk(child)
                case S_IFREG, S_IFLNK:
                    c.blockBytes += (UInt64(st.st_size) + 4095) / 4096 * 4096
                default: break
                }
            }
        }
        try walk(root)
        return c
    }

    /// The smallest filesystem that holds `c` with room for ext4's own metadata (inode tables at
    /// one 256-byte inode per 16 KiB, a journal of up to 64 MiB) and 10% slack.
    static func required(_ c: Content) -> UInt64 {
        let data = c.blockBytes + c.blockBytes / 10 + c.inodes * 256
        let withMeta = data + data / 64 + (64 << 20) + (16 << 20)
        return (withMeta + (1 << 20) - 1) / (1 << 20) * (1 << 20)
    }

    /// The disk size to build, or the error the sizing rule gives.
    static func diskSize(for c: Content, sizing: Sizing, what: String) throws -> UInt64 {
        let need = required(c)
        let needGB = (need + gib - 1) / gib
        if let e = sizing.explicitBytes {
            guard e >= need else {
                throw FurcateError(
                    .invalidArgument, "disk size \(format(e)) is too small for \(what): it needs at least \(needGB) GB")
            }
            return e
        }
        let auto = max(sizing.minimum, needGB * gib)
        guard auto <= sizing.maximum else {
            throw FurcateError(
                .invalidArgument, "\(what) needs a \(needGB) GB disk, more than the \(sizing.maximum / gib) GB maximum")
        }
        return auto
    }

    static func format(_ b: UInt64) -> String {
        b % gib == 0 ? "\(b / gib) GB" : String(format: "%.2f GB", Double(b) / Double(gib))
    }

    /// Runs `mkfs.ext4 -d root` into a sparse file of `size` bytes.
    public static func mkfs(root: String, output: String, size: UInt64, label: String) throws {
        let fd = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw FurcateError.system("open", errno: errno, path: output) }
        let r = ftruncate(fd, off_t(size))
        let e = errno
        close(fd)
        guard r == 0 else { throw FurcateError.system("ftruncate", errno: e, path: output) }
        // -m 0: guests mostly run as root; -E root_owner: / owned by root whoever runs this.
        try runTool(
            "mkfs.ext4",
            [
                "-q", "-F", "-m", "0", "-L", String(label.prefix(16)), "-E", "root_owner=0:0,lazy_itable_init=0", "-d",
                root, output,
            ])
    }

    /// Runs a tool from PATH; a failure carries its stderr.
    public static func runTool(_ tool: String, _ args: [String]) throws {
        try HostTool.run(tool, args, package: "e2fsprogs")
    }
}
