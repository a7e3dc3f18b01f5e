import Foundation
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// Verified blobs by digest, as files `DIR/sha256/<hex>` — the layout of an OCI layout's
/// `blobs/` directory. A blob appears under its name only once its digest and size checked out;
/// a download in progress is `<hex>.partial` and a later pull resumes it.
public struct BlobCache: Sendable {
    /// The cache's directory; blobs are under `sha256/`.
    public let directory: String

    /// A cache in `directory`, created if missing.
    /// - Throws: when the directory cannot be made.
    public init(directory: String) throws {
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory + "/sha256", withIntermediateDirectories: true)
    }

    /// Where blob `d` is (or will be) kept.
    public func path(_ d: Digest) -> String { directory + "/sha256/" + d.hex }
    func partialPath(_ d: Digest) -> String { path(d) + ".partial" }

    /// Whether blob `d` is complete in the cache.
    public func contains(_ d: Digest) -> Bool { access(path(d), R_OK) == 0 }

    /// A small blob (manifest, config) read whole; `limit` guards against a huge one.
    func read(_ d: Digest, limit: Int = 8 << 20) throws -> [UInt8] {
        var st = stat()
        guard stat(path(d), &st) == 0 else { throw FurcateError.system("stat", errno: errno, path: path(d)) }
        guard st.st_size <= limit else {
            throw FurcateError(
                .invalidArgument, "blob \(d) is \(st.st_size) bytes; at most \(limit) are read for a manifest or config"
            )
        }
        return try [UInt8](Data(contentsOf: URL(fileURLWithPath: path(d))))
    }

    /// Stores `bytes` under `d` after checking they hash to it.
    func put(_ bytes: [UInt8], as d: Digest, what: String) throws {
        guard Digest(of: bytes) == d else {
            throw FurcateError(
                .damaged, "\(what) has digest \(Digest(of: bytes)), not \(d): refusing it (digest mismatch)")
        }
        if contains(d) { return }
        let w = try PartialBlob(cache: self, digest: d, resume: false)
        try bytes.withUnsafeBytes { try w.append($0) }
        try w.commit(size: Int64(bytes.count), what: what)
    }

    /// Copies a local file into the cache, verifying it on the way.
    func importFile(_ src: String, as d: Digest, size: Int64?, what: String) throws {
        if contains(d) { return }
        let fd = open(src, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FurcateError.system("open", errno: errno, path: src) }
        defer { close(fd) }
        let w = try PartialBlob(cache: self, digest: d, resume: false)
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buf.deallocate() }
        while true {
            let n = Glibc.read(fd, buf.baseAddress, buf.count)
            if n < 0 {
                if errno == EINTR { continue }
                throw FurcateError.system("read", errno: errno, path: src)
            }
            if n == 0 { break }
            try w.append(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
        }
        try w.commit(size: size, what: what)
    }

    /// Removes blob `d` and any partial download of it.
    public func remove(_ d: Digest) {
        unlink(path(d))
        unlink(partialPath(d))
    }

    /// Every complete blob in the cache.
    public func list() -> [Digest] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory + "/sha256")) ?? [])
            .compactMap { try? Digest(parsing: "sha256:" + $0) }
    }
}

/// A blob being written: appended to `<hex>.partial`, hashed as it goes, renamed into place by
/// `commit` only when the digest (and size) match. Not thread-safe; one writer per digest.
final class PartialBlob {
    let cache: BlobCache
    let digest: Digest
    private let fd: Int32
    private var verifier = DigestVerifier()
    /// Bytes already present (resumed) plus bytes appended.
    var offset: UInt64 { verifier.count }

    /// Opens the partial file; with `resume`, keeps and re-hashes what an earlier attempt wrote.
    init(cache: BlobCache, digest: Digest, resume: Bool) throws {
        self.cache = cache
        self.digest = digest
        let p = cache.partialPath(digest)
        fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC | (resume ? 0 : O_TRUNC), 0o644)
        guard fd >= 0 else { throw FurcateError.system("open", errno: errno, path: p) }
        if resume {
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
            defer { buf.deallocate() }
            while true {
                let n = Glibc.read(fd, buf.baseAddress, buf.count)
                if n <= 0 { break }
                verifier.update(UnsafeRawBufferPointer(rebasing: buf[0..<n]))
            }
            lseek(fd, off_t(verifier.count), SEEK_SET)
            _ = ftruncate(fd, off_t(verifier.count))
        }
    }

    deinit { close(fd) }

    /// Starts over (the server ignored a range request).
    func restart() throws {
        guard ftruncate(fd, 0) == 0, lseek(fd, 0, SEEK_SET) == 0 else {
            throw FurcateError.system("ftruncate", errno: errno, path: cache.partialPath(digest))
        }
        verifier = DigestVerifier()
    }

    func append(_ bytes: UnsafeRawBufferPointer) throws {
        try writeFully(fd, bytes, path: cache.partialPath(digest))
        verifier.update(bytes)
    }

    /// Verifies, syncs and renames into place; a mismatch deletes the partial file.
    func commit(size: Int64?, what: String) throws {
        do {
            try verifier.verify(digest, size: size, what: what)
        } catch {
            unlink(cache.partialPath(digest))
            throw error
        }
        guard fsync(fd) == 0 else { throw FurcateError.system("fsync", errno: errno, path: cache.partialPath(digest)) }
        guard rename(cache.partialPath(digest), cache.path(digest)) == 0 else {
            throw FurcateError.system("rename", errno: errno, path: cache.path(digest))
        }
    }
}
