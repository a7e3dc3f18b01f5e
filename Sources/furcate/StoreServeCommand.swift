import ArgumentParser
import BlockStore
import Foundation
import FurcateCore
import Logging
import StoreFS
import StoreServer

#if canImport(Glibc)
    import Glibc
#endif

extension StoreCommand {
    /// `furcate store serve`: the storage process. `furcate serve` starts it (detached, in its
    /// own session) and it outlives a crash or restart of the server: the store, its mount
    /// (where every VM's disk and RAM live) and the engine's control socket are here.
    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Run the storage process of a data directory: the store, its FUSE mount and the control socket furcate serve uses (started by furcate serve; ends at SIGTERM or when a graceful furcate serve stops it).",
            shouldDisplay: false)
        @OptionGroup var data: DataOption

        func run() throws {
            try reportingErrors {
                StoreFS.blockTerminationSignals()  // before any other thread starts
                bootstrapOnce
                let l = data.layout
                let logger = Logger(label: "furcate.storage")
                let store = try data.openOrCreateStore()
                defer { store.close() }
                try FileManager.default.createDirectory(atPath: l.mountpoint, withIntermediateDirectories: true)
                let fs = StoreFS(store: store, mountpoint: l.mountpoint)
                var server: StoreServer?
                try fs.run {
                    do {
                        // Stopping is the signal path: the FUSE server's signal thread unmounts.
                        server = try StoreServer(
                            store: store, mountpoint: l.mountpoint, socketPath: l.storeSocket, logger: logger
                        ) { kill(getpid(), SIGTERM) }
                        logger.notice(
                            "storage process serving",
                            metadata: ["socket": "\(l.storeSocket)", "mountpoint": "\(l.mountpoint)"])
                    } catch {
                        logger.error("cannot serve the control socket; unmounting", metadata: ["error": "\(error)"])
                        kill(getpid(), SIGTERM)
                    }
                }
                server?.stop()
            }
        }
    }
}
