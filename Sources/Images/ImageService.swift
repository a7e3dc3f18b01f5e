import BlockStore
import Foundation
import FurcateCore
import Logging
import RecordStore

#if canImport(Glibc)
    import Glibc
#endif

/// An image turned into a bootable rootfs: a read-only store snapshot plus what the image said
/// about itself.
public struct ImageRecord: Codable, Sendable, Hashable {
    /// The store snapshot holding the ext4 rootfs (`image-<digest hex>[-<N>g]`), also the id.
    public var storeFile: String
    /// Every reference this image was pulled as (`docker.io/library/python:3.12-slim`, …).
    public var references: [String]
    /// The manifest digest (for a docker-archive, the config digest: the archive has no manifest).
    public var digest: Digest
    /// The image configuration's digest.
    public var configDigest: Digest
    /// What the image says about itself (env, workdir, user, cmd, …).
    public var config: ImageConfig
    /// How many layers it has.
    public var layers: Int
    /// Compressed layer bytes (what was downloaded).
    public var compressedBytes: Int64
    /// Bytes of files in the unpacked rootfs (4 KiB blocks).
    public var contentBytes: UInt64
    /// The ext4 filesystem's size.
    public var diskBytes: UInt64
    /// When its rootfs was built, Unix seconds.
    public var createdAt: Double
}

/// What a pull reports as it goes.
public enum PullEvent: Sendable {
    /// The manifest is read: layer sizes (compressed) bottom first.
    case resolved(digest: Digest, layerSizes: [Int64])
    /// Bytes of layer `index` fetched so far (`total` from its descriptor).
    case layerProgress(index: Int, bytes: UInt64, total: Int64)
    case layerCached(index: Int)
    case unpacking(index: Int, of: Int)
    case buildingFilesystem(diskBytes: UInt64, contentBytes: UInt64)
    case importing
    /// The image was already built for this digest and size: nothing was done.
    case reused
}

/// What an image service is made with.
public struct ImageServiceOptions: Sendable {
    /// Where blobs, scratch space and the image database live.
    public var directory: String
    /// The static guest agent to put at `/.furcate/agent` (nil: none — the image boots without).
    public var agentPath: String?
    /// Registries spoken to over plain HTTP besides loopback ones.
    public var insecureRegistries: Set<String> = []
    /// The automatic disk size's floor and every disk's ceiling (InstaVM: 3 GB and 16 GB).
    public var minimumDiskBytes: UInt64 = 3 << 30
    /// The largest rootfs any pull may build.
    public var maximumDiskBytes: UInt64 = 16 << 30
    /// Where the service logs (label `furcate.images`).
    public var logger = Logger(label: "furcate.images")

    /// Options keeping blobs and the image database in `directory`, injecting the agent at `agentPath` (nil: none); the
    /// rest take the defaults above.
    public init(directory: String, agentPath: String?) {
        self.directory = directory
        self.agentPath = agentPath
    }
}

/// Pulls images and builds their rootfs files in the store; one per (digest, disk size), shared
/// by every pull that resolves to it. Work runs on threads of its own, never on the actor.
public actor ImageService {
    /// The store the rootfs files go into.
    public nonisolated let store: any StoreAccess
    /// What the service was made with.
    public nonisolated let options: ImageServiceOptions
    let cache: BlobCache
    private let db: ImageDatabase
    private var records: [String: ImageRecord] = [:]
    private var building: [String: Task<ImageRecord, any Error>] = [:]
    private var fetching: [Digest: Task<Void, any Error>] = [:]
    static let tmpPrefix = "image-tmp-"

    /// Opens (creating) the image directory and database, and removes what interrupted pulls
    /// left (scratch directories, half-imported store files).
    /// - Throws: when the directory or database cannot be used.
    public init(store: any StoreAccess, options: ImageServiceOptions) throws {
        self.store = store
        self.options = options
        try FileManager.default.createDirectory(atPath: options.directory + "/tmp", withIntermediateDirectories: true)
        cache = try BlobCache(directory: options.directory + "/blobs")
        db = try ImageDatabase(path: options.directory + "/images.sqlite")
        for r in try db.all() { records[r.storeFile] = r }
        // What an interrupted build left: scratch directories and half-imported store files.
        for d in (try? FileManager.default.contentsOfDirectory(atPath: options.directory + "/tmp")) ?? [] {
            try? FileManager.default.removeItem(atPath: options.directory + "/tmp/" + d)
        }
        for f in (try? store.listFiles()) ?? [] where f.name.hasPrefix(Self.tmpPrefix) { try? store.deleteFile(f.name) }
        // A record whose store file is gone (deleted behind our back) is dropped.
        for (name, _) in records where (try? store.fileExists(name)) != true {
            records[name] = nil
            try? db.delete(name)
        }
    }

    /// Every image built, oldest first.
    public func list() -> [ImageRecord] { records.values.sorted { $0.createdAt < $1.createdAt } }

    /// An image by store file name, digest (full or a 12+ digit prefix) or a reference it was
    /// pulled as. - Throws: `.notFound`.
    public func image(_ key: String) throws -> ImageRecord {
        if let r = records[key] { return r }
        let normalized = (try? ImageReference(parsing: key))?.description
        let hex = key.hasPrefix("sha256:") ? String(key.dropFirst(7)) : key
        let matches = records.values.filter {
            $0.references.contains(key) || (normalized.map($0.references.contains) ?? false)
                || (hex.count >= 12 && ($0.digest.hex.hasPrefix(hex) || $0.configDigest.hex.hasPrefix(hex)))
        }
        guard let r = matches.max(by: { $0.createdAt < $1.createdAt }) else {
            throw FurcateError(.notFound, "no image '\(key.prefix(200))' (furcate image ls)")
        }
        return r
    }

    /// Deletes an image's rootfs snapshot and record (VMs already made from it keep their disks).
    public func delete(_ key: String) throws {
        let r = try image(key)
        if try store.fileExists(r.storeFile) { try store.deleteFile(r.storeFile) }
        try db.delete(r.storeFile)
        records[r.storeFile] = nil
    }

    /// Pulls `reference` and builds its rootfs (or finds it built): the image record.
    /// - Parameters:
    ///   - diskBytes: an explicit disk size; nil picks one (3–16 GB by content).
    /// - Throws: `.notFound` (unknown image), `.unavailable` (registry unreachable),
    ///   `.unauthenticated`, `.damaged` (digest mismatch), `.invalidArgument` (bad reference,
    ///   a `..` path in a layer, a disk too small) — and then nothing of the build is left.
    public func pull(
        _ reference: String, credentials: RegistryCredentials? = nil, diskBytes: UInt64? = nil,
        progress: @escaping @Sendable (PullEvent) -> Void = { _ in }
    ) async throws -> ImageRecord {
        let ref = try ImageReference(parsing: reference)
        if let e = diskBytes, e > options.maximumDiskBytes {
            throw FurcateError(
                .invalidArgument,
                "disk size \(RootfsBuilder.format(e)) is more than the \(options.maximumDiskBytes >> 30) GB maximum")
        }
        let source = try makeSource(ref, credentials: credentials)
        defer { source.cleanup() }
        let resolved = try await source.resolve()
        progress(.resolved(digest: resolved.manifestDigest, layerSizes: resolved.layers.map(\.size)))
        let name = "image-" + resolved.manifestDigest.hex + (diskBytes.map { "-\($0 >> 20)m" } ?? "")
        if var r = records[name], (try? store.fileExists(name)) == true {
            progress(.reused)
            if !r.references.contains(ref.description) {
                r.references.append(ref.description)
                try db.save(r)
                records[name] = r
            }
            return r
        }
        if let t = building[name] { return try await t.value }
        let task = Task {
            try await self.build(
                name: name, ref: ref, resolved: resolved, source: source, diskBytes: diskBytes, progress: progress)
        }
        building[name] = task
        defer { building[name] = nil }
        let r = try await task.value
        records[name] = r
        try db.save(r)
        return r
    }

    private func makeSource(_ ref: ImageReference, credentials: RegistryCredentials?) throws -> any ImageSource {
        switch ref {
        case .registry(let r):
            return RegistrySource(
                client: RegistryClient(
                    ref: r, credentials: credentials, insecure: options.insecureRegistries.contains(r.domain),
                    logger: options.logger),
                cache: cache)
        case .ociLayout(let p, let t):
            return OCILayoutSource(path: p, tag: t, cache: cache)
        case .dockerArchive(let p):
            return DockerArchiveSource(path: p, cache: cache, scratch: scratchDirectory())
        case .rootfsTar(let p):
            return RootfsTarSource(path: p, cache: cache)
        }
    }

    private nonisolated func scratchDirectory() -> String {
        options.directory + "/tmp/" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
    }

    /// One download per blob at a time, however many pulls want it.
    private func fetch(
        _ d: Descriptor, source: any ImageSource, what: String, progress: @escaping @Sendable (UInt64) -> Void
    ) async throws {
        if cache.contains(d.digest) { return }
        if let t = fetching[d.digest] { return try await t.value }
        let t = Task { try await source.fetchLayer(d, what: what, progress: progress) }
        fetching[d.digest] = t
        defer { fetching[d.digest] = nil }
        try await t.value
    }

    private func build(
        name: String, ref: ImageReference, resolved: ResolvedImage, source: any ImageSource, diskBytes: UInt64?,
        progress: @escaping @Sendable (PullEvent) -> Void
    ) async throws -> ImageRecord {
        for (i, l) in resolved.layers.enumerated() {
            if cache.contains(l.digest) {
                progress(.layerCached(index: i))
                continue
            }
            try await fetch(l, source: source, what: "layer \(i + 1) (\(l.digest.short)) of \(ref)") { bytes in
                progress(.layerProgress(index: i, bytes: bytes, total: l.size))
            }
        }
        let scratch = scratchDirectory()
        let opts = options
        let cache = self.cache
        let store = self.store
        let sizing = RootfsBuilder.Sizing(
            explicitBytes: diskBytes, minimum: opts.minimumDiskBytes, maximum: opts.maximumDiskBytes)
        return try await onThread("image-build") {
            defer { try? FileManager.default.removeItem(atPath: scratch) }
            let root = scratch + "/rootfs"
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            let applier = LayerApplier(root: root)
            for (i, l) in resolved.layers.enumerated() {
                progress(.unpacking(index: i, of: resolved.layers.count))
                try applier.apply(
                    layerAt: cache.path(l.digest), diffID: resolved.diffIDs[i],
                    what: "layer \(i + 1) (\(l.digest.short)) of \(ref)")
            }
            applier.finish()
            if applier.xattrFailures > 0 {
                opts.logger.warning(
                    "some extended attributes could not be set",
                    metadata: ["image": "\(ref)", "count": "\(applier.xattrFailures)"])
            }
            try RootfsBuilder.inject(root: root, agentPath: opts.agentPath, config: resolved.config)
            let content = try RootfsBuilder.measure(root)
            let size = try RootfsBuilder.diskSize(for: content, sizing: sizing, what: ref.description)
            progress(.buildingFilesystem(diskBytes: size, contentBytes: content.blockBytes))
            let ext4 = scratch + "/rootfs.ext4"
            try RootfsBuilder.mkfs(root: root, output: ext4, size: size, label: "furcate-root")
            progress(.importing)
            let tmpName = Self.tmpPrefix + String(UInt64.random(in: 0...UInt64.max), radix: 36)
            do {
                try store.importFile(tmpName, fromHostPath: ext4)
                if try store.fileExists(name) { try store.deleteFile(name) }
                try store.snapshotFile(tmpName, as: name)
                try store.deleteFile(tmpName)
            } catch {
                try? store.deleteFile(tmpName)
                throw error
            }
            return ImageRecord(
                storeFile: name, references: [ref.description], digest: resolved.manifestDigest,
                configDigest: resolved.configDigest,
                config: resolved.config, layers: resolved.layers.count,
                compressedBytes: resolved.layers.reduce(0) { $0 + $1.size },
                contentBytes: content.blockBytes, diskBytes: size, createdAt: Date().timeIntervalSince1970)
        }
    }
}

/// The image table: one JSON record per image (RecordStore).
final class ImageDatabase: Sendable {
    private let db: RecordDatabase
    private static let table = RecordTable("images", key: "store_file")

    init(path: String) throws {
        db = try RecordDatabase(
            path: path, what: "image",
            migrations: ["CREATE TABLE images (store_file TEXT PRIMARY KEY, record BLOB NOT NULL)"])
    }

    func save(_ r: ImageRecord) throws { try db.save(Self.table, key: r.storeFile, r) }
    func delete(_ name: String) throws { try db.delete(Self.table, key: name) }
    func all() throws -> [ImageRecord] { try db.all(Self.table) }
}
