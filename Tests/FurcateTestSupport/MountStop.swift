import StoreFS
import Testing

extension BackgroundMount {
    /// `stop()`, failing the test when files of the mount were still open once its grace ran
    /// out (a leaked descriptor, or a QEMU the test did not end), and naming their holders.
    public func stopChecked(sourceLocation: SourceLocation = #_sourceLocation) {
        let stopped = stop()
        guard stopped.graceExpired else { return }
        let connection = stopped.aborted ? "aborted" : "not abortable"
        let holders = stopped.holders.joined(separator: ", ")
        Issue.record(
            "files of \(fs.mountpoint) were still open \(BackgroundMount.defaultGrace) after it was unmounted (connection \(connection)); held by: \(holders)",
            sourceLocation: sourceLocation)
    }
}
