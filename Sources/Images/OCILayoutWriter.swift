import Foundation
import FurcateCore

/// Writes an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) holding one image:
/// for benchmarks and tests that need an image without a registry, and for exporting.
public enum OCILayoutWriter {
    /// One layer: its blob (compressed or not) and the digest of its uncompressed tar.
    public struct Layer: Sendable {
        /// The layer blob as stored (tar, maybe gzip-compressed).
        public var blob: [UInt8]
        /// The digest of its uncompressed tar.
        public var diffID: Digest
        /// A layer of `blob` whose uncompressed tar has digest `diffID`.
        public init(blob: [UInt8], diffID: Digest) {
            self.blob = blob
            self.diffID = diffID
        }

        /// A layer from a plain tar's bytes, gzip-compressed with `gzip -n` when `gzip` is set.
        public static func tar(_ tar: [UInt8], gzip: Bool, scratch: String) throws -> Layer {
            let diff = Digest(of: tar)
            guard gzip else { return Layer(blob: tar, diffID: diff) }
            let p = scratch + "/layer-\(diff.short).tar"
            try Data(tar).write(to: URL(fileURLWithPath: p))
            try RootfsBuilder.runTool("gzip", ["-n", "-f", p])
            defer { try? FileManager.default.removeItem(atPath: p + ".gz") }
            return Layer(blob: [UInt8](try Data(contentsOf: URL(fileURLWithPath: p + ".gz"))), diffID: diff)
        }
    }

    /// Writes the layout; returns the manifest digest.
    @discardableResult
    public static func write(_ dir: String, tag: String, layers: [Layer], config: ImageConfig) throws -> Digest {
        try FileManager.default.createDirectory(atPath: dir + "/blobs/sha256", withIntermediateDirectories: true)
        try Data(#"{"imageLayoutVersion":"1.0.0"}"#.utf8).write(to: URL(fileURLWithPath: dir + "/oci-layout"))
        func put(_ b: [UInt8]) throws -> Digest {
            let d = Digest(of: b)
            try Data(b).write(to: URL(fileURLWithPath: dir + "/blobs/sha256/" + d.hex))
            return d
        }
        var inner: [String: Any] = [:]
        if let e = config.env { inner["Env"] = e }
        if let w = config.workingDir { inner["WorkingDir"] = w }
        if let u = config.user { inner["User"] = u }
        if let c = config.cmd { inner["Cmd"] = c }
        if let e = config.entrypoint { inner["Entrypoint"] = e }
        let cfg: [String: Any] = [
            "architecture": "amd64", "os": "linux", "config": inner,
            "rootfs": ["type": "layers", "diff_ids": layers.map { $0.diffID.description }],
        ]
        let cfgBytes = [UInt8](try JSONSerialization.data(withJSONObject: cfg, options: [.sortedKeys]))
        let cfgDigest = try put(cfgBytes)
        var descs: [[String: Any]] = []
        for l in layers {
            let gz = l.blob.count > 2 && l.blob[0] == 0x1f && l.blob[1] == 0x8b
            descs.append([
                "mediaType": gz
                    ? "application/vnd.oci.image.layer.v1.tar+gzip" : "application/vnd.oci.image.layer.v1.tar",
                "digest": try put(l.blob).description, "size": l.blob.count,
            ])
        }
        let manifest: [String: Any] = [
            "schemaVersion": 2, "mediaType": MediaType.ociManifest,
            "config": ["mediaType": MediaType.ociConfig, "digest": cfgDigest.description, "size": cfgBytes.count],
            "layers": descs,
        ]
        let mBytes = [UInt8](try JSONSerialization.data(withJSONObject: manifest, options: [.sortedKeys]))
        let mDigest = try put(mBytes)
        let index: [String: Any] = [
            "schemaVersion": 2,
            "manifests": [
                [
                    "mediaType": MediaType.ociManifest, "digest": mDigest.description, "size": mBytes.count,
                    "annotations": ["org.opencontainers.image.ref.name": tag],
                ] as [String: Any]
            ],
        ]
        try Data(try JSONSerialization.data(withJSONObject: index, options: [.sortedKeys])).write(
            to: URL(fileURLWithPath: dir + "/index.json"))
        return mDigest
    }
}
