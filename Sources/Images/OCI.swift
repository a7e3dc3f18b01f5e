import Foundation
import FurcateCore

/// The OCI and Docker media types Furcate reads.
public enum MediaType {
    /// An OCI image index (a manifest per platform).
    public static let ociIndex = "application/vnd.oci.image.index.v1+json"
    /// An OCI image manifest.
    public static let ociManifest = "application/vnd.oci.image.manifest.v1+json"
    /// An OCI image configuration.
    public static let ociConfig = "application/vnd.oci.image.config.v1+json"
    /// A Docker manifest list (a manifest per platform).
    public static let dockerList = "application/vnd.docker.distribution.manifest.list.v2+json"
    /// A Docker image manifest, schema 2.
    public static let dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
    /// A Docker schema 1 manifest (deprecated; refused with a message saying so).
    public static let dockerSchema1 = "application/vnd.docker.distribution.manifest.v1+json"
    /// A signed Docker schema 1 manifest (refused likewise).
    public static let dockerSchema1Signed = "application/vnd.docker.distribution.manifest.v1+prettyjws"

    /// What a manifest request accepts, most specific first.
    static let manifestAccept = [ociIndex, dockerList, ociManifest, dockerManifest].joined(separator: ", ")
    static func isIndex(_ t: String?) -> Bool { t == ociIndex || t == dockerList }
}

/// What an image of an index was built for.
public struct Platform: Codable, Hashable, Sendable {
    /// The CPU architecture (`amd64`, `arm64`).
    public var architecture: String
    /// The operating system (`linux`).
    public var os: String
    /// The CPU variant (`v8`), if any.
    public var variant: String?
}

/// A content descriptor: what a blob is, its digest and size.
public struct Descriptor: Codable, Hashable, Sendable {
    /// The blob's media type.
    public var mediaType: String?
    /// The blob's digest.
    public var digest: Digest
    /// The blob's size in bytes.
    public var size: Int64
    /// The platform, for a manifest in an index.
    public var platform: Platform?
    /// Free-form key/value annotations.
    public var annotations: [String: String]?
}

/// An image index or Docker manifest list: one manifest per platform.
struct ImageIndex: Codable {
    var schemaVersion: Int?
    var mediaType: String?
    var manifests: [Descriptor]
}

/// An image manifest: a config blob and layers, bottom first.
struct ImageManifest: Codable {
    var schemaVersion: Int?
    var mediaType: String?
    var config: Descriptor
    var layers: [Descriptor]
}

/// The parts of an image configuration a VM uses. Unknown fields are ignored.
public struct ImageConfig: Codable, Hashable, Sendable {
    /// `NAME=VALUE` environment entries.
    public var env: [String]?
    /// The directory commands run in.
    public var workingDir: String?
    /// The user commands run as.
    public var user: String?
    /// The default command.
    public var cmd: [String]?
    /// The entrypoint.
    public var entrypoint: [String]?
    /// Free-form labels.
    public var labels: [String: String]?
    /// Ports the image says it listens on (`80/tcp`).
    public var exposedPorts: [String]?

    /// A configuration with the given fields.
    public init(
        env: [String]? = nil, workingDir: String? = nil, user: String? = nil, cmd: [String]? = nil,
        entrypoint: [String]? = nil
    ) {
        self.env = env
        self.workingDir = workingDir
        self.user = user
        self.cmd = cmd
        self.entrypoint = entrypoint
    }
}

/// The image configuration blob (`application/vnd.oci.image.config.v1+json`).
struct ImageConfigFile: Decodable {
    struct Inner: Decodable {
        var Env: [String]?
        var WorkingDir: String?
        var User: String?
        var Cmd: [String]?
        var Entrypoint: [String]?
        var Labels: [String: String]?
        var ExposedPorts: [String: AnyCodableEmpty]?
    }
    struct RootFS: Decodable {
        var type: String?
        var diff_ids: [Digest]
    }
    var architecture: String?
    var os: String?
    var config: Inner?
    var rootfs: RootFS

    var imageConfig: ImageConfig {
        var c = ImageConfig(
            env: config?.Env, workingDir: config?.WorkingDir, user: config?.User, cmd: config?.Cmd,
            entrypoint: config?.Entrypoint)
        c.labels = config?.Labels
        c.exposedPorts = config?.ExposedPorts.map { $0.keys.sorted() }
        if c.workingDir == "" { c.workingDir = nil }
        if c.user == "" { c.user = nil }
        return c
    }
}

/// `{}` values (ExposedPorts' members): decoded and ignored.
struct AnyCodableEmpty: Decodable {
    init(from decoder: any Decoder) throws {}
}

/// The three things an image is: its manifest digest, its config and its layers.
struct ResolvedImage: Sendable {
    var manifestDigest: Digest
    var configDigest: Digest
    var config: ImageConfig
    /// Digests of the uncompressed layers, from the config, one per layer.
    var diffIDs: [Digest]
    var layers: [Descriptor]
}

enum OCIDecode {
    static func decode<T: Decodable>(_ type: T.Type, _ bytes: [UInt8], what: String) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(bytes))
        } catch {
            throw FurcateError(.unsupportedFormat, "\(what) is not valid JSON of the expected shape: \(error)")
        }
    }

    /// The media type a manifest document says it has (its own field, then the HTTP header).
    static func mediaType(of bytes: [UInt8], header: String?) -> String? {
        struct Peek: Decodable { var mediaType: String?; var manifests: [Descriptor]?; var schemaVersion: Int? }
        let p = try? JSONDecoder().decode(Peek.self, from: Data(bytes))
        if let t = p?.mediaType { return t }
        if p?.manifests != nil { return MediaType.ociIndex }
        if p?.schemaVersion == 1 { return MediaType.dockerSchema1 }
        return header?.split(separator: ";").first.map { $0.trimmingCharacters(in: .whitespaces) }
            ?? MediaType.ociManifest
    }

    /// Picks linux/amd64 from an index.
    static func pickPlatform(_ index: ImageIndex, what: String) throws -> Descriptor {
        let candidates = index.manifests.filter { $0.platform?.os == "linux" && $0.platform?.architecture == "amd64" }
        if let d = candidates.first(where: { $0.platform?.variant == nil || $0.platform?.variant == "v1" })
            ?? candidates.first
        {
            return d
        }
        // An index without platforms (e.g. an OCI layout's index.json) names one manifest.
        if index.manifests.count == 1, index.manifests[0].platform == nil { return index.manifests[0] }
        let have = index.manifests.compactMap { $0.platform.map { "\($0.os)/\($0.architecture)" } }
        throw FurcateError(
            .notFound,
            "\(what) has no linux/amd64 image (it has: \(have.isEmpty ? "none" : have.joined(separator: ", ")))")
    }

    /// Checks a manifest and its config and returns the resolved image.
    static func resolve(manifestDigest: Digest, manifestBytes: [UInt8], configBytes: [UInt8], what: String) throws
        -> ResolvedImage
    {
        let m = try decode(ImageManifest.self, manifestBytes, what: "the manifest of \(what)")
        let cfg = try decode(ImageConfigFile.self, configBytes, what: "the config of \(what)")
        if let os = cfg.os, os != "linux" {
            throw FurcateError(.unsupportedFormat, "\(what) is a \(os) image; Furcate runs linux images")
        }
        if let a = cfg.architecture, a != "amd64" {
            throw FurcateError(.unsupportedFormat, "\(what) is built for \(a); this host runs amd64 guests")
        }
        guard cfg.rootfs.diff_ids.count == m.layers.count else {
            throw FurcateError(
                .damaged,
                "\(what): its config lists \(cfg.rootfs.diff_ids.count) layers but its manifest \(m.layers.count)")
        }
        for l in m.layers {
            let t = l.mediaType ?? ""
            if t.contains("foreign") || t.contains("nondistributable") {
                throw FurcateError(
                    .unsupportedFormat, "\(what) has a foreign layer (\(t)); Furcate pulls distributable layers only")
            }
            guard t.isEmpty || t.contains("tar") else {
                throw FurcateError(
                    .unsupportedFormat, "\(what) has a layer of media type '\(t)', which is not a tar layer")
            }
        }
        return ResolvedImage(
            manifestDigest: manifestDigest, configDigest: m.config.digest, config: cfg.imageConfig,
            diffIDs: cfg.rootfs.diff_ids, layers: m.layers)
    }
}
