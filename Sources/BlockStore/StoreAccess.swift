// StoreAccess — what the layers above ask of a store, by file name: the engine's whole use of
// it. `BlockStore` answers in-process (tests, the CLI's one-shot commands, the storage process
// itself); `StoreClient` answers over the storage process's control socket, so `furcate serve`
// holds no store state a crash of it could lose. Bytes of a file go through the mount
// (QEMU's disk and RAM, device-state streams); only whole-file operations come here.
import Foundation
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

/// Whole-file operations on a store, by name. Every method may throw what `BlockStore`'s
/// counterpart throws (`.notFound`, `.exists`, `.notPermitted` on a snapshot, `.diskFull`,
/// `.damaged`, `.io`); a remote store adds `.unavailable` when its process cannot be reached.
public protocol StoreAccess: Sendable {
    /// The codec new blocks are written with.
    var defaultCodec: Codec { get throws }
    /// Every file and snapshot.
    func listFiles() throws -> [FileInfo]
    /// Whether `name` exists.
    func fileExists(_ name: String) throws -> Bool
    /// A new empty file of `size` bytes (sparse) with blocks of `blockSize` (nil: the store's).
    func makeFile(_ name: String, blockSize: Int?, size: UInt64) throws
    /// `name`'s size in bytes.
    func fileSize(_ name: String) throws -> UInt64
    /// Bytes of `name` that hold data (not holes).
    func allocatedBytes(_ name: String) throws -> UInt64
    /// A writable O(1) copy of `source` named `destination`.
    func cloneFile(_ source: String, to destination: String) throws
    /// A read-only O(1) copy of `name` (its synced state) named `snapshotName`.
    func snapshotFile(_ name: String, as snapshotName: String) throws
    /// `destination` takes `source`'s contents (a file QEMU has open keeps its identity).
    func replaceFileContents(of destination: String, with source: String) throws
    /// Removes `name`; its blocks are freed by GC once nothing else uses them.
    func deleteFile(_ name: String) throws
    /// A new file `name` with the bytes of the host file at `path` (holes kept).
    func importFile(_ name: String, fromHostPath path: String) throws
    /// How `name`'s distinct blocks are stored.
    func compressionStats(_ name: String) throws -> CompressionStats
    /// Re-encodes `name`'s blocks with `codec` (see `BlockStore.recompress`); stops early when
    /// `isCancelled` says so.
    func recompressFile(_ name: String, codec: Codec, isCancelled: @escaping @Sendable () -> Bool) throws
        -> CompressionStats
}

extension BlockStore: StoreAccess {
    /// `StoreAccess.listFiles`, in this process.
    public func listFiles() throws -> [FileInfo] { try list() }
    /// `StoreAccess.fileExists`, in this process.
    public func fileExists(_ name: String) throws -> Bool { try exists(name) }
    /// `StoreAccess.makeFile`, in this process.
    public func makeFile(_ name: String, blockSize: Int?, size: UInt64) throws {
        let f = try createFile(name, blockSize: blockSize)
        do { if size > 0 { try f.truncate(to: size) } } catch {
            try? delete(name)
            throw error
        }
    }
    /// `StoreAccess.fileSize`, in this process.
    public func fileSize(_ name: String) throws -> UInt64 { try file(name).size }
    /// `StoreAccess.allocatedBytes`, in this process.
    public func allocatedBytes(_ name: String) throws -> UInt64 {
        let f = try file(name)
        var total: UInt64 = 0
        var at: UInt64 = 0
        while let start = try f.nextData(from: at) {
            let end = try f.nextHole(from: start)
            total += end - start
            at = end
        }
        return total
    }
    /// `StoreAccess.cloneFile`, in this process.
    public func cloneFile(_ source: String, to destination: String) throws { _ = try clone(source, to: destination) }
    /// `StoreAccess.snapshotFile`, in this process.
    public func snapshotFile(_ name: String, as snapshotName: String) throws {
        _ = try snapshot(name, as: snapshotName)
    }
    /// `StoreAccess.replaceFileContents`, in this process.
    public func replaceFileContents(of destination: String, with source: String) throws {
        try replaceContents(of: file(destination), with: file(source))
    }
    /// `StoreAccess.deleteFile`, in this process.
    public func deleteFile(_ name: String) throws { try delete(name) }
    /// `StoreAccess.importFile`, in this process.
    public func importFile(_ name: String, fromHostPath path: String) throws {
        let fd = try syscall("open", path: path) { Glibc.open(path, O_RDONLY | O_CLOEXEC) }
        defer { Glibc.close(fd) }
        let f = try createFile(name)
        do { try FileTransfer.importFile(fd: fd, path: path, into: f) } catch {
            try? delete(name)
            throw error
        }
    }
    /// `StoreAccess.recompressFile`, in this process.
    public func recompressFile(_ name: String, codec: Codec, isCancelled: @escaping @Sendable () -> Bool) throws
        -> CompressionStats
    { try recompress(name, codec: codec, isCancelled: isCancelled) }
}
