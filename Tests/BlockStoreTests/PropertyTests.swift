import Foundation
import FurcateCore
import FurcateTestSupport
import Testing

@testable import BlockStore

/// Random sequences of every store operation over many files, checked against a trivial
/// in-memory model after each step.
@Suite(.ownThread) struct PropertyTests {
    enum Op: CustomStringConvertible {
        case write(String, UInt64, Int, UInt64)
        case truncate(String, UInt64)
        case punch(String, UInt64, UInt64)
        case clone(String, String)
        case snapshot(String, String)
        case delete(String)
        case sync(String)
        case gc
        case reopen

        var description: String {
            switch self {
            case .write(let f, let o, let l, _): return "write(\(f), \(o), \(l))"
            case .truncate(let f, let s): return "truncate(\(f), \(s))"
            case .punch(let f, let o, let l): return "punch(\(f), \(o), \(l))"
            case .clone(let a, let b): return "clone(\(a) -> \(b))"
            case .snapshot(let a, let b): return "snapshot(\(a) -> \(b))"
            case .delete(let f): return "delete(\(f))"
            case .sync(let f): return "sync(\(f))"
            case .gc: return "gc"
            case .reopen: return "reopen"
            }
        }
    }

    @Test(arguments: Array(1...8) as [UInt64])
    func randomOperationsMatchModel(seed: UInt64) throws {
        let dir = TempDir("prop")
        let path = dir.sub("s")
        let bs = [4096, 8192, 65536][Int(seed % 3)]
        var store: BlockStore? = try BlockStore.create(
            at: path, blockSize: bs, codec: seed % 2 == 0 ? .lz4 : .zstd(level: 3))
        var model: [String: [UInt8]] = [:]
        var snapshots: Set<String> = []
        var rng = SplitMix64(seed: seed)
        let maxSize = UInt64(bs * 12)
        var counter = 0
        func pick() -> String? { model.keys.sorted().randomElement(using: &rng) }
        func pickFile() -> String? { model.keys.filter { !snapshots.contains($0) }.sorted().randomElement(using: &rng) }

        for step in 0..<500 {
            let s = store!
            var op: Op
            switch rng.next() % 20 {
            case 0...6:
                guard let f = pickFile() else {
                    counter += 1
                    op = .clone("", "n\(counter)")
                    break
                }
                let len = Int(rng.next() % UInt64(bs * 2)) + 1
                op = .write(f, rng.next() % (maxSize - UInt64(len)), len, rng.next())
            case 7, 8: op = pickFile().map { .truncate($0, rng.next() % maxSize) } ?? .gc
            case 9, 10: op = pickFile().map { .punch($0, rng.next() % maxSize, rng.next() % UInt64(bs * 3)) } ?? .gc
            case 11, 12:
                counter += 1
                op = .clone(pick() ?? "", "c\(counter)")
            case 13:
                counter += 1
                op = pickFile().map { .snapshot($0, "s\(counter)") } ?? .gc
            case 14: op = model.count > 3 ? pick().map { .delete($0) } ?? .gc : .gc
            case _ where model.count > 12: op = pick().map { .delete($0) } ?? .gc
            case 15, 16: op = pickFile().map { .sync($0) } ?? .gc
            case 17: op = .gc
            case 18: op = .reopen
            default:
                counter += 1
                op = .clone("", "n\(counter)")
            }
            switch op {
            case .write(let f, let off, let len, let seed2):
                let data = pattern(len, seed: seed2)
                try s.file(f).write(data, at: off)
                var c = model[f]!
                if c.count < Int(off) + len { c += [UInt8](repeating: 0, count: Int(off) + len - c.count) }
                c.replaceSubrange(Int(off)..<(Int(off) + len), with: data)
                model[f] = c
            case .truncate(let f, let size):
                try s.file(f).truncate(to: size)
                var c = model[f]!
                if c.count > Int(size) {
                    c.removeLast(c.count - Int(size))
                } else {
                    c += [UInt8](repeating: 0, count: Int(size) - c.count)
                }
                model[f] = c
            case .punch(let f, let off, let len):
                try s.file(f).punchHole(offset: off, length: len)
                var c = model[f]!
                for k in min(Int(off), c.count)..<min(Int(off + len), c.count) { c[k] = 0 }
                model[f] = c
            case .clone(let src, let dst):
                if src.isEmpty {
                    try s.createFile(dst)
                    model[dst] = []
                } else {
                    try s.clone(src, to: dst)
                    model[dst] = model[src]
                }
            case .snapshot(let src, let dst):
                try s.snapshot(src, as: dst)
                model[dst] = model[src]
                snapshots.insert(dst)
            case .delete(let f):
                try s.delete(f)
                model[f] = nil
                snapshots.remove(f)
            case .sync(let f):
                try s.file(f).sync()
            case .gc:
                _ = try s.gc()
            case .reopen:
                s.close()
                store = nil
                store = try BlockStore.open(at: path)
            }
            // Check every file after every step.
            let s2 = store!
            #expect(Set(try s2.list().map(\.name)) == Set(model.keys), "step \(step) \(op)")
            for (name, content) in model {
                let f = try s2.file(name)
                #expect(f.size == UInt64(content.count), "step \(step) \(op): size of \(name)")
                let got = try f.read(at: 0, count: content.count + 1)
                let same = sameBytes(got, content)
                #expect(same, "step \(step) \(op): contents of \(name)")
                if !same { return }
            }
        }
        let r = try store!.fsck()
        #expect(r.clean, "\(r.problems) \(r.damage)")
        _ = try store!.gc()
        let r2 = try store!.fsck()
        #expect(r2.clean && r2.unreferencedBlocks == 0)
    }
}
