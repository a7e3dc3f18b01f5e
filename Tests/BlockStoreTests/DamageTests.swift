import Foundation
import FurcateCore
import FurcateTestSupport
import GRDB
import Testing

@testable import BlockStore

#if canImport(Glibc)
    import Glibc
#endif

@Suite(.ownThread) struct DamageTests {
    /// Flips bytes in the middle of the payload of the record holding block `id`.
    func corrupt(_ s: BlockStore, _ id: BlockID) throws {
        let loc = try #require(try s.index.read("t") { db in try s.index.location(db, id) })
        let path = s.packs.path(of: loc.pack)
        let fd = open(path, O_RDWR)
        defer { close(fd) }
        var b: UInt8 = 0
        let at = off_t(loc.offset) + off_t(PackFormat.recordHeaderSize) + off_t(loc.storedLength / 2)
        #expect(pread(fd, &b, 1, at) == 1)
        b ^= 0x5a
        #expect(pwrite(fd, &b, 1, at) == 1)
    }

    @Test func damagedBlockIsAnIOErrorNamingFileAndOffsetThenQuarantined() throws {
        let dir = TempDir()
        let path = dir.sub("s")
        let data = pattern(10 * 4096, seed: 11)
        var victim = BlockID.hole
        do {
            let s = try BlockStore.create(at: path, blockSize: 4096)
            try s.createFile("disk").write(data, at: 0)
            try s.clone("disk", to: "fork")
            victim = data[(3 * 4096)..<(4 * 4096)].withUnsafeBytes { BlockID.hash($0) }
            try corrupt(s, victim)
            s.close()
        }
        let s = try BlockStore.open(at: path)  // a cold cache: the damage must be seen
        let f = try s.file("disk")
        #expect {
            _ = try f.read(at: 3 * 4096 + 5, count: 10)
        } throws: { e in
            let fe = e as? FurcateError
            return fe?.code == .damaged && fe?.posixErrno == EIO && fe!.description.contains("disk")
                && fe!.description.contains("offset \(3 * 4096)")
        }
        // Undamaged blocks still read.
        #expect(try f.read(at: 0, count: 3 * 4096) == Array(data[0..<(3 * 4096)]))

        let r = try s.fsck()
        #expect(!r.clean)
        #expect(r.damage.map(\.file) == ["disk", "fork"])
        #expect(r.damage.allSatisfy { $0.offset == 3 * 4096 && $0.block == victim.hex })

        let repaired = try s.fsck(repair: true)
        #expect(repaired.quarantined == 1)
        #expect(throws: FurcateError.self) { try f.read(at: 3 * 4096, count: 1) }
        // Writing the same content again stores it afresh and heals every file that uses it.
        let healer = try s.createFile("healer")
        try healer.write(Array(data[(3 * 4096)..<(4 * 4096)]), at: 0)
        try healer.sync()
        #expect(try s.file("fork").read(at: 0, count: data.count) == data)
        #expect(try s.fsck().clean)
    }

    @Test func corruptPackHeaderIsReported() throws {
        let (tmp, s) = try makeStore()
        defer { withExtendedLifetime(tmp) {} }
        try s.createFile("f").write(pattern(5000, seed: 1), at: 0)
        try s.syncAll()
        let p = s.packs.path(of: s.packs.packIDsOnDisk()[0])
        let fd = open(p, O_RDWR)
        #expect(pwrite(fd, "XXXX", 4, 0) == 4)
        close(fd)
        let r = try s.fsck()
        #expect(r.problems.contains { $0.contains("magic") })
    }

    /// Seen in CI's crash test: the writer killed between creating a pack and writing its
    /// header left an empty pack file, which fsck reported. Opening the store removes such a
    /// file (it holds nothing and nothing refers to it); a pack with a header stays.
    @Test func aPackTornAtItsCreationIsRemovedAtOpen() throws {
        let dir = TempDir()
        let path = dir.sub("s")
        do {
            let s = try BlockStore.create(at: path, blockSize: 4096)
            try s.createFile("f").write(pattern(5000, seed: 3), at: 0)
            try s.syncAll()
            s.close()
        }
        let packs = path + "/packs/"
        let before = try FileManager.default.contentsOfDirectory(atPath: packs).sorted()
        for (name, bytes) in [(PackFormat.fileName(90), 0), (PackFormat.fileName(91), PackFormat.headerSize - 1)] {
            #expect(FileManager.default.createFile(atPath: packs + name, contents: Data(repeating: 0, count: bytes)))
        }
        let s = try BlockStore.open(at: path)
        defer { s.close() }
        #expect(try FileManager.default.contentsOfDirectory(atPath: packs).sorted() == before)
        let r = try s.fsck()
        #expect(r.clean, "\(r.problems)")
        #expect(try s.file("f").read(at: 0, count: 5000) == pattern(5000, seed: 3))
        try s.createFile("g").write(pattern(5000, seed: 4), at: 0)
        try s.syncAll()
        #expect(s.packs.packIDsOnDisk().last! > 91, "a removed pack's id is not reused")
    }

    static var canMountTmpfs: Bool { geteuid() == 0 }

    /// Fills a small tmpfs: the writer gets `.diskFull`, and the store still opens, passes fsck
    /// and holds everything synced before.
    @Test(.enabled(if: canMountTmpfs, "mounting a small tmpfs needs root"))
    func fullDiskIsACleanErrorAndLosesNothingSynced() throws {
        let dir = TempDir("full")
        let mnt = dir.sub("mnt")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        guard mount("tmpfs", mnt, "tmpfs", 0, "size=3m") == 0 else {
            print("skipping full-disk test: mount tmpfs failed: \(String(cString: strerror(errno)))")
            return
        }
        defer { umount2(mnt, Int32(MNT_DETACH)) }
        let path = mnt + "/s"
        let first = pattern(64 << 10, seed: 1)
        var sawDiskFull = false
        do {
            var o = StoreOptions()
            o.dirtyBudgetBytes = 64 << 10
            let s = try BlockStore.create(at: path, blockSize: 4096, codec: .none, options: o)
            let f = try s.createFile("f")
            try f.write(first, at: 0)
            try f.sync()
            var rng = SplitMix64(seed: 1)
            for k in 0..<2000 {
                var chunk = [UInt8](repeating: 0, count: 64 << 10)
                for i in 0..<chunk.count { chunk[i] = UInt8(truncatingIfNeeded: rng.next()) }
                do {
                    try f.write(chunk, at: UInt64(64 << 10) * UInt64(k + 1))
                    if k % 4 == 0 { try f.sync() }
                } catch let e as FurcateError {
                    #expect(e.code == .diskFull, "\(e)")
                    #expect(e.description.contains("disk full"))
                    sawDiskFull = true
                    break
                }
            }
            s.close()
        }
        #expect(sawDiskFull)
        let s = try BlockStore.open(at: path)
        #expect(try s.file("f").read(at: 0, count: first.count) == first)
        #expect(try s.fsck().clean)
    }
}
