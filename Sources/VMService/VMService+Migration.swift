import BlockStore
import Foundation
import FurcateCore
import Hypervisor

#if canImport(Glibc)
    import Glibc
#endif

// Device state moves between QEMU and the store over a unix socket in the VM's run
// directory: QEMU writes its migration stream to us (snapshot) or reads it from us (restore),
// and we move the bytes between the socket and the store file through the mount (the store
// itself may live in another process: see StoreAccess). No helper process: QEMU's `exec:`
// would fork a shell and `cat` per snapshot and restore, and need the sandbox to allow it.
extension VMService {
    /// Has QEMU migrate to a socket we listen on and writes the stream into the new store
    /// file `name` (made here, synced when the stream ends). Returns the stream's length. The
    /// caller has stopped the VM and set capabilities.
    func saveStream(_ p: QEMUProcess, _ vm: VMInfo, into name: String) async throws -> Int {
        try store.makeFile(name, blockSize: nil, size: 0)
        let file = try MountedFile(path(file: name), writable: true)
        let sock = runDirectory(vm.id) + "/migrate.sock"
        let listener = try UnixSocket.listen(sock)
        defer {
            close(listener)
            unlink(sock)
        }
        let reader = Task {
            try await onThread("migrate-in-\(vm.id)") {
                let c = try UnixSocket.accept(listener, deadline: .now + .seconds(30))
                defer { close(c) }
                var offset: UInt64 = 0
                return try UnixSocket.readToEnd(c) { chunk in
                    try file.write(chunk, at: offset)
                    offset += UInt64(chunk.count)
                }
            }
        }
        do {
            try await p.startSavingDeviceState(to: sock)
            try await waitForMigration(p, vm.id)
        } catch {
            reader.cancel()
            _ = Glibc.shutdown(listener, Int32(SHUT_RDWR))
            _ = try? await reader.value
            throw error
        }
        let n = try await reader.value
        try file.sync()
        return n
    }

    /// Has a QEMU waiting in `-incoming defer` listen on a socket and sends it `file`.
    func loadStream(_ p: QEMUProcess, _ vm: VMInfo, from name: String) async throws {
        let file = try MountedFile(path(snapshot: name), writable: false)
        let sock = runDirectory(vm.id) + "/migrate.sock"
        unlink(sock)
        defer { unlink(sock) }
        try await p.startLoadingDeviceState(from: sock)
        let alive: @Sendable () -> Bool = { p.exitStatus == nil }
        try await onThread("migrate-out-\(vm.id)") {
            let fd = try UnixSocket.connect(sock, deadline: .now + .seconds(10), alive: alive)
            defer { close(fd) }
            let size = try file.size()
            let chunk = 1 << 20
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
            defer { buf.deallocate() }
            var offset: UInt64 = 0
            while offset < size {
                let n = try file.read(into: buf, at: offset)
                if n == 0 { break }
                do { try UnixSocket.writeAll(fd, UnsafeRawBufferPointer(rebasing: buf[0..<n])) } catch {
                    // QEMU closes its end when it rejects the stream; waitForIncoming reports why.
                    return
                }
                offset += UInt64(n)
            }
        }
        try await waitForIncoming(p, vm.id)
    }
}

/// A store file opened through the mount, for moving a device-state stream.
final class MountedFile: Sendable {
    let fd: Int32
    let path: String

    init(_ path: String, writable: Bool) throws {
        self.path = path
        fd = try syscall("open", path: path) { open(path, (writable ? O_WRONLY : O_RDONLY) | O_CLOEXEC) }
    }

    deinit { close(fd) }

    func write(_ chunk: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < chunk.count {
            let n = try syscall("pwrite", path: path) {
                pwrite(
                    fd, UnsafeRawBufferPointer(rebasing: chunk[done...]).baseAddress, chunk.count - done,
                    off_t(offset) + off_t(done))
            }
            done += n
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        try syscall("pread", path: path) { pread(fd, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    func size() throws -> UInt64 {
        var st = stat()
        _ = try syscall("fstat", path: path) { fstat(fd, &st) }
        return UInt64(st.st_size)
    }

    func sync() throws { _ = try syscall("fsync", path: path) { fsync(fd) } }
}
