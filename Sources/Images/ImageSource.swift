import Foundation
import FurcateCore
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// Fetches an image's manifest, config and layers into the blob cache, wherever it lives.
protocol ImageSource: Sendable {
    /// Reads (and caches) the manifest and config, verified.
    func resolve() async throws -> ResolvedImage
    /// Puts layer `d` in the cache (verified); `progress` gets bytes so far.
    func fetchLayer(_ d: Descriptor, what: String, progress: @escaping @Sendable (UInt64) -> Void) async throws
    /// Removes scratch space the source made.
    func cleanup()
}

extension ImageSource {
    func cleanup() {}
}

/// A registry: manifests by tag or digest, blobs downloaded with resume.
struct RegistrySource: ImageSource {
    let client: RegistryClient
    let cache: BlobCache

    func resolve() async throws -> ResolvedImage {
        let ref = client.ref
        var (bytes, digest, type) = try await client.manifest(ref.manifestReference)
        if type == MediaType.dockerSchema1 || type == MediaType.dockerSchema1Signed {
            throw FurcateError(
                .unsupportedFormat,
                "\(ref) is a Docker schema 1 image, which is deprecated; push it again with a current Docker or skopeo")
        }
        if MediaType.isIndex(type) {
            let index = try OCIDecode.decode(ImageIndex.self, bytes, what: "the index of \(ref)")
            let pick = try OCIDecode.pickPlatform(index, what: "\(ref)")
            (bytes, digest, type) = try await client.manifest(pick.digest.description)
            guard digest == pick.digest else {
                throw FurcateError(
                    .damaged, "registry \(ref.domain) sent manifest \(digest) for \(pick.digest) (digest mismatch)")
            }
        }
        let manifest = try OCIDecode.decode(ImageManifest.self, bytes, what: "the manifest of \(ref)")
        try await client.blob(manifest.config, into: cache, what: "the config of \(ref)") { _ in }
        let config = try cache.read(manifest.config.digest)
        try cache.put(bytes, as: digest, what: "the manifest of \(ref)")
        return try OCIDecode.resolve(
            manifestDigest: digest, manifestBytes: bytes, configBytes: config, what: ref.description)
    }

    func fetchLayer(_ d: Descriptor, what: String, progress: @escaping @Sendable (UInt64) -> Void) async throws {
        try await client.blob(d, into: cache, what: what, progress: progress)
    }
}

/// A local OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`).
struct OCILayoutSource: ImageSource {
    let path: String
    let tag: String?
    let cache: BlobCache

    private func blob(_ d: Digest) -> String { path + "/blobs/sha256/" + d.hex }

    private func readBlob(_ d: Descriptor, what: String) throws -> [UInt8] {
        try cache.importFile(blob(d.digest), as: d.digest, size: d.size, what: what)
        return try cache.read(d.digest)
    }

    func resolve() async throws -> ResolvedImage {
        let what = "oci:\(path)"
        guard FileManager.default.fileExists(atPath: path + "/oci-layout") else {
            throw FurcateError(.notFound, "\(path) is not an OCI image layout (no oci-layout file)")
        }
        let indexBytes: [UInt8]
        do { indexBytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path + "/index.json"))) } catch {
            throw FurcateError(.notFound, "cannot read \(path)/index.json", underlying: UnderlyingMessage(error))
        }
        let index = try OCIDecode.decode(ImageIndex.self, indexBytes, what: "\(path)/index.json")
        var desc: Descriptor
        if let tag {
            guard let d = index.manifests.first(where: { $0.annotations?["org.opencontainers.image.ref.name"] == tag })
            else {
                let tags = index.manifests.compactMap { $0.annotations?["org.opencontainers.image.ref.name"] }
                throw FurcateError(
                    .notFound,
                    "\(what) has no image tagged '\(tag)' (tags: \(tags.isEmpty ? "none" : tags.joined(separator: ", ")))"
                )
            }
            desc = d
        } else if index.manifests.count == 1 {
            desc = index.manifests[0]
        } else {
            desc = try OCIDecode.pickPlatform(index, what: what)
        }
        var bytes = try readBlob(desc, what: "manifest \(desc.digest) of \(what)")
        if MediaType.isIndex(OCIDecode.mediaType(of: bytes, header: desc.mediaType)) {
            let inner = try OCIDecode.decode(ImageIndex.self, bytes, what: "index \(desc.digest) of \(what)")
            desc = try OCIDecode.pickPlatform(inner, what: what)
            bytes = try readBlob(desc, what: "manifest \(desc.digest) of \(what)")
        }
        let manifest = try OCIDecode.decode(ImageManifest.self, bytes, what: "the manifest of \(what)")
        let config = try readBlob(manifest.config, what: "the config of \(what)")
        return try OCIDecode.resolve(manifestDigest: desc.digest, manifestBytes: bytes, configBytes: config, what: what)
    }

    func fetchLayer(_ d: Descriptor, what: String, progress: @escaping @Sendable (UInt64) -> Void) async throws {
        try cache.importFile(blob(d.digest), as: d.digest, size: d.size, what: what)
        progress(UInt64(max(d.size, 0)))
    }
}

/// A `docker save` tarball: `manifest.json` naming a config file and uncompressed layer tars.
/// It is unpacked once into a scratch directory; the image is known by its config digest
/// (Docker's image id), since the archive carries no manifest.
struct DockerArchiveSource: ImageSource {
    let path: String
    let cache: BlobCache
    let scratch: String

    func resolve() async throws -> ResolvedImage {
        let what = "docker-archive:\(path)"
        let files = try await onThread("docker-archive") { [path, scratch] in try Self.unpack(path, into: scratch) }
        struct Entry: Decodable { var Config: String; var Layers: [String] }
        guard let mbytes = files["manifest.json"] else {
            throw FurcateError(.unsupportedFormat, "\(what) has no manifest.json (not a docker save archive)")
        }
        let entries = try OCIDecode.decode(
            [Entry].self, try [UInt8](Data(contentsOf: URL(fileURLWithPath: mbytes))), what: "\(what) manifest.json")
        guard let e = entries.first else { throw FurcateError(.unsupportedFormat, "\(what) names no image") }
        guard let cfgPath = files[e.Config] else {
            throw FurcateError(.unsupportedFormat, "\(what) lacks its config \(e.Config)")
        }
        let config = try [UInt8](Data(contentsOf: URL(fileURLWithPath: cfgPath)))
        let configDigest = Digest(of: config)
        try cache.put(config, as: configDigest, what: "the config of \(what)")
        var layers: [Descriptor] = []
        for l in e.Layers {
            guard let lp = files[l] else { throw FurcateError(.unsupportedFormat, "\(what) lacks its layer \(l)") }
            let d = try Self.digestOfFile(lp)
            try cache.importFile(lp, as: d.0, size: d.1, what: "layer \(l) of \(what)")
            layers.append(Descriptor(mediaType: "application/vnd.docker.image.rootfs.diff.tar", digest: d.0, size: d.1))
        }
        let manifest = ImageManifest(
            schemaVersion: 2, mediaType: MediaType.ociManifest,
            config: Descriptor(mediaType: MediaType.ociConfig, digest: configDigest, size: Int64(config.count)),
            layers: layers)
        let mb = try JSONEncoder().encode(manifest)
        return try OCIDecode.resolve(
            manifestDigest: configDigest, manifestBytes: [UInt8](mb), configBytes: config, what: what)
    }

    func cleanup() { try? FileManager.default.removeItem(atPath: scratch) }

    func fetchLayer(_ d: Descriptor, what: String, progress: @escaping @Sendable (UInt64) -> Void) async throws {
        guard cache.contains(d.digest) else {
            throw FurcateError(.internalError, "layer \(d.digest) of docker-archive:\(path) was not unpacked")
        }
        progress(UInt64(d.size))
    }

    static func digestOfFile(_ p: String) throws -> (Digest, Int64) {
        let r = try LayerReader(path: p, raw: true)
        try r.drain()
        return (r.verifier.digest, Int64(r.verifier.count))
    }

    /// Unpacks the archive's regular files (flat names checked) into `dir`: name → path.
    static func unpack(_ archive: String, into dir: String) throws -> [String: String] {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let reader = try LayerReader(path: archive)
        let tar = TarReader(reader, what: "docker-archive:\(archive)")
        var out: [String: String] = [:]
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
        defer { buf.deallocate() }
        var n = 0
        while let e = try tar.next() {
            guard e.kind == .file else { continue }
            let comps = try LayerApplier.components(e.path, what: "docker-archive:\(archive)")
            let name = comps.joined(separator: "/")
            n += 1
            let p = dir + "/\(n)"
            let fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw FurcateError.system("open", errno: errno, path: p) }
            defer { close(fd) }
            try tar.copyData(to: fd, path: p, buffer: buf)
            out[name] = p
        }
        return out
    }
}

/// A root filesystem tarball as a one-layer image: its digest is the file's, its config says
/// only PATH (like `docker import`).
struct RootfsTarSource: ImageSource {
    let path: String
    let cache: BlobCache

    func resolve() async throws -> ResolvedImage {
        let what = "rootfs:\(path)"
        guard FileManager.default.isReadableFile(atPath: path) else {
            throw FurcateError(.notFound, "cannot read \(path)")
        }
        let (digest, size, diffID) = try await onThread("rootfs-digest") { [path] in
            // One pass for a plain tar (its digest is its diff_id); a compressed one needs both.
            let r = try LayerReader(path: path)
            try r.drain()
            if r.compression == .none { return (r.verifier.digest, Int64(r.verifier.count), r.verifier.digest) }
            let (d, n) = try DockerArchiveSource.digestOfFile(path)
            return (d, n, r.verifier.digest)
        }
        try cache.importFile(path, as: digest, size: size, what: what)
        let config = ImageConfig(env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
        return ResolvedImage(
            manifestDigest: digest, configDigest: digest, config: config, diffIDs: [diffID],
            layers: [Descriptor(mediaType: "application/vnd.oci.image.layer.v1.tar", digest: digest, size: size)])
    }

    func fetchLayer(_ d: Descriptor, what: String, progress: @escaping @Sendable (UInt64) -> Void) async throws {
        progress(UInt64(d.size))
    }
}
