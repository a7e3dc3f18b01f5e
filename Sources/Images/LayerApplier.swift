import CSysXattr
import Foundation
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// Applies image layers, bottom first, to a directory: whiteouts (`.wh.NAME`) delete what lower
/// layers made, opaque markers (`.wh..wh..opq`) empty a directory of lower layers' entries;
/// ownership, modes, xattrs, symlinks, hard links, device nodes and mtimes are kept.
///
/// Safety: an entry whose path has a `..` component or is absolute after cleaning is refused
/// (the layer fails: a legitimate image never has one). Symlinks met on the way to an entry are
/// resolved inside the root (as if chrooted), so no entry can land outside it. The directory is
/// Furcate's own scratch space, written by nothing else while this runs.
final class LayerApplier {
    let root: String
    private var dirTimes: [String: Int64] = [:]
    private let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
    /// Entries made by the layer being applied (relative paths): an opaque marker keeps them.
    private var madeThisLayer = Set<String>()
    private(set) var xattrFailures = 0

    init(root: String) {
        self.root = root
    }

    deinit { buf.deallocate() }

    /// Applies one layer blob (any compression) and checks its uncompressed digest.
    func apply(layerAt path: String, diffID: Digest, what: String) throws {
        let reader = try LayerReader(path: path)
        let tar = TarReader(reader, what: what)
        madeThisLayer = []
        while let e = try tar.next() {
            try applyEntry(e, tar: tar, what: what)
        }
        try reader.drain()
        try reader.verifier.verify(diffID, size: nil, what: "the uncompressed \(what)")
    }

    /// Sets directory mtimes last (writing into a directory changes its mtime).
    func finish() {
        for (rel, t) in dirTimes {
            var ts = [timespec(tv_sec: Int(t), tv_nsec: 0), timespec(tv_sec: Int(t), tv_nsec: 0)]
            _ = utimensat(AT_FDCWD, host(rel), &ts, AT_SYMLINK_NOFOLLOW)
        }
    }

    private func host(_ rel: String) -> String { rel.isEmpty ? root : root + "/" + rel }

    /// Cleans an entry path into components; refuses `..` and empty results.
    static func components(_ path: String, what: String) throws -> [String] {
        let comps = path.split(separator: "/").map(String.init).filter { $0 != "." && !$0.isEmpty }
        if comps.contains("..") {
            throw FurcateError(
                .invalidArgument,
                "\(what) has an entry '\(path.prefix(200))' with a '..' component: refusing the layer (path traversal)")
        }
        return comps
    }

    /// Resolves directory components inside the root, following symlinks within it and making
    /// missing directories (when `create`). Returns the path relative to the root.
    private func resolveDir(_ comps: [String], create: Bool, what: String, entry: String) throws -> String {
        var resolved: [String] = []
        var pending = comps[...]
        var links = 0
        while let c = pending.first {
            pending = pending.dropFirst()
            if c == "." || c.isEmpty { continue }
            if c == ".." { _ = resolved.popLast(); continue }
            let rel = (resolved + [c]).joined(separator: "/")
            var st = stat()
            if lstat(host(rel), &st) != 0 {
                guard errno == ENOENT, create else {
                    throw FurcateError(
                        .invalidArgument, "\(what): the directory of '\(entry.prefix(200))' does not exist")
                }
                guard mkdir(host(rel), 0o755) == 0 else {
                    throw FurcateError.system("mkdir", errno: errno, path: host(rel))
                }
                madeThisLayer.insert(rel)
                resolved.append(c)
            } else if st.st_mode & S_IFMT == S_IFDIR {
                resolved.append(c)
            } else if st.st_mode & S_IFMT == S_IFLNK {
                links += 1
                guard links <= 40 else {
                    throw FurcateError(
                        .invalidArgument, "\(what): too many symlinks on the way to '\(entry.prefix(200))'")
                }
                let target = try readLink(host(rel))
                if target.hasPrefix("/") { resolved = [] }
                pending = (target.split(separator: "/").map(String.init) + pending)[...]
            } else {
                throw FurcateError(
                    .invalidArgument,
                    "\(what): '\(entry.prefix(200))' needs '\(rel)' to be a directory, but it is a file")
            }
        }
        return resolved.joined(separator: "/")
    }

    private func readLink(_ p: String) throws -> String {
        var b = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink(p, &b, b.count - 1)
        guard n >= 0 else { throw FurcateError.system("readlink", errno: errno, path: p) }
        return String(decoding: b[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private func join(_ dir: String, _ name: String) -> String { dir.isEmpty ? name : dir + "/" + name }

    /// Removes whatever is at `rel` (recursively for a directory); nothing there is fine.
    private func remove(_ rel: String) throws {
        var st = stat()
        guard lstat(host(rel), &st) == 0 else { return }
        if st.st_mode & S_IFMT == S_IFDIR {
            try FileManager.default.removeItem(atPath: host(rel))
        } else if unlink(host(rel)) != 0 {
            throw FurcateError.system("unlink", errno: errno, path: host(rel))
        }
    }

    private func applyEntry(_ e: TarEntry, tar: TarReader, what: String) throws {
        let comps = try Self.components(e.path, what: what)
        guard let name = comps.last else {
            // The root itself ("./"): take its mode and owner.
            if e.kind == .directory { try setMeta(e, rel: "", isLink: false); dirTimes[""] = e.mtime }
            return
        }
        let dir = try resolveDir(Array(comps.dropLast()), create: true, what: what, entry: e.path)
        // Whiteouts apply to lower layers only.
        if name == ".wh..wh..opq" {
            let children = (try? FileManager.default.contentsOfDirectory(atPath: host(dir))) ?? []
            for c in children where !madeThisLayer.contains(join(dir, c)) { try remove(join(dir, c)) }
            return
        }
        if name.hasPrefix(".wh..wh.") { return }  // other aufs metadata
        if name.hasPrefix(".wh.") {
            let victim = String(name.dropFirst(4))
            guard !victim.isEmpty, victim != ".", victim != ".." else { return }
            try remove(join(dir, victim))
            return
        }
        let rel = join(dir, name)
        let p = host(rel)
        var st = stat()
        let exists = lstat(p, &st) == 0
        if exists && !(e.kind == .directory && st.st_mode & S_IFMT == S_IFDIR) { try remove(rel) }
        madeThisLayer.insert(rel)
        switch e.kind {
        case .directory:
            if !(exists && st.st_mode & S_IFMT == S_IFDIR) {
                guard mkdir(p, 0o700) == 0 else { throw FurcateError.system("mkdir", errno: errno, path: p) }
            }
            try setMeta(e, rel: rel, isLink: false)
            dirTimes[rel] = e.mtime
        case .file:
            let fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw FurcateError.system("open", errno: errno, path: p) }
            defer { close(fd) }
            try tar.copyData(to: fd, path: p, buffer: buf)
            try setMeta(e, rel: rel, isLink: false)
            try setTime(e, p)
        case .symlink:
            guard symlink(e.linkName, p) == 0 else { throw FurcateError.system("symlink", errno: errno, path: p) }
            try setMeta(e, rel: rel, isLink: true)
            try setTime(e, p)
        case .hardlink:
            let tcomps = try Self.components(e.linkName, what: what)
            guard let tname = tcomps.last else {
                throw FurcateError(.invalidArgument, "\(what): hard link '\(e.path.prefix(200))' names no target")
            }
            let tdir = try resolveDir(Array(tcomps.dropLast()), create: false, what: what, entry: e.linkName)
            let target = host(join(tdir, tname))
            var tst = stat()
            guard lstat(target, &tst) == 0, tst.st_mode & S_IFMT != S_IFDIR else {
                throw FurcateError(
                    .invalidArgument,
                    "\(what): hard link '\(e.path.prefix(200))' points at '\(e.linkName.prefix(200))', which is missing or a directory"
                )
            }
            guard link(target, p) == 0 else { throw FurcateError.system("link", errno: errno, path: p) }
        case .charDevice, .blockDevice, .fifo:
            let type: mode_t = e.kind == .charDevice ? S_IFCHR : e.kind == .blockDevice ? S_IFBLK : S_IFIFO
            let dev = Self.makedev(e.devMajor, e.devMinor)
            guard mknod(p, type | 0o600, dev) == 0 else { throw FurcateError.system("mknod", errno: errno, path: p) }
            try setMeta(e, rel: rel, isLink: false)
            try setTime(e, p)
        }
    }

    static func makedev(_ major: UInt32, _ minor: UInt32) -> dev_t {
        let ma = UInt64(major), mi = UInt64(minor)
        return dev_t((ma & 0xfff) << 8 | (mi & 0xff) | (mi & ~0xff) << 12 | (ma & ~0xfff) << 32)
    }

    private func setMeta(_ e: TarEntry, rel: String, isLink: Bool) throws {
        let p = host(rel)
        guard lchown(p, e.uid, e.gid) == 0 else { throw FurcateError.system("lchown", errno: errno, path: p) }
        if !isLink {
            // After chown, which clears set-id bits.
            guard chmod(p, mode_t(e.mode)) == 0 else { throw FurcateError.system("chmod", errno: errno, path: p) }
        }
        for (k, v) in e.xattrs {
            let r = v.withUnsafeBytes { lsetxattr(p, k, $0.baseAddress, $0.count, 0) }
            if r != 0 { xattrFailures += 1 }
        }
    }

    private func setTime(_ e: TarEntry, _ p: String) throws {
        var ts = [timespec(tv_sec: Int(e.mtime), tv_nsec: 0), timespec(tv_sec: Int(e.mtime), tv_nsec: 0)]
        _ = utimensat(AT_FDCWD, p, &ts, AT_SYMLINK_NOFOLLOW)
    }
}
