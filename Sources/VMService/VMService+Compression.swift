import BlockStore
import Foundation
import FurcateCore
import Synchronization

/// A flag a background job polls.
final class CancelFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    func cancel() { flag.store(true, ordering: .relaxed) }
    var isCancelled: Bool { flag.load(ordering: .relaxed) }
}

// Snapshot memory compression (hypeman's model): the snapshot's RAM payload is re-encoded in
// the background with the codec asked for. It never races a fork or restore of the snapshot:
// recompression keeps every block's content address and leaves the old pack records readable
// until the next GC, so a restore reading the memory meanwhile gets the same bytes either way.
extension VMService {
    /// Sets a snapshot's memory compression and starts re-encoding in the background (state
    /// `compressing`, then `compressed`, `none` when disabled, or `error`). A job already
    /// running for the snapshot is cancelled first.
    /// - Throws: `.notFound`, `.invalidArgument` (algorithm or level).
    @discardableResult
    public func setSnapshotCompression(_ id: String, _ c: SnapshotCompression) async throws -> SnapshotInfo {
        var s = try snapshotInfo(id)
        let codec = try c.codec(fallback: try store.defaultCodec)
        await stopCompression(id)
        s.compression = c
        s.compressionState = .compressing
        s.compressionError = nil
        try db.save(s)
        snapshots[id] = s
        let flag = CancelFlag()
        let file = s.memoryPayloadFile
        let store = self.store
        let task = Task {
            let result: Result<CompressionStats, any Error>
            do {
                result = .success(
                    try await onThread("compress-\(id)") {
                        try store.recompressFile(file, codec: codec) { flag.isCancelled }
                    })
            } catch {
                result = .failure(error)
            }
            guard !flag.isCancelled else { return }
            self.finishCompression(id, enabled: c.enabled, result)
        }
        compressionJobs[id] = (task, flag)
        logger.info("snapshot compression started", metadata: ["snapshot.id": "\(id)", "codec": "\(codec)"])
        return s
    }

    /// Waits for a snapshot's compression job (if any) and returns the snapshot.
    public func awaitCompression(_ id: String) async throws -> SnapshotInfo {
        if let job = compressionJobs[id] { await job.task.value }
        return try snapshotInfo(id)
    }

    /// The payload's current storage, measured now.
    public func snapshotMemoryStats(_ id: String) throws -> CompressionStats {
        try store.compressionStats(try snapshotInfo(id).memoryPayloadFile)
    }

    func stopCompression(_ id: String) async {
        guard let job = compressionJobs.removeValue(forKey: id) else { return }
        job.cancel.cancel()
        await job.task.value
    }

    private func finishCompression(_ id: String, enabled: Bool, _ result: Result<CompressionStats, any Error>) {
        compressionJobs[id] = nil
        guard var s = snapshots[id] else { return }  // deleted meanwhile
        switch result {
        case .success(let st):
            s.compressionState = enabled ? .compressed : CompressionState.none
            s.uncompressedSizeBytes = st.uncompressedBytes
            s.compressedSizeBytes = st.storedBytes
        case .failure(let e):
            s.compressionState = .error
            s.compressionError = (e as? FurcateError)?.description ?? "\(e)"
            logger.warning("snapshot compression failed", metadata: ["snapshot.id": "\(id)", "error": "\(e)"])
        }
        try? db.save(s)
        snapshots[id] = s
    }
}
