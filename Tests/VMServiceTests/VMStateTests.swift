import BlockStore
import FurcateCore
import FurcateTestSupport
import Hypervisor
import Testing

@testable import VMService

/// The lifecycle table and id shapes, without QEMU.
struct VMStateTests {
    @Test func aDataDirectoryTooDeepForSocketsIsRefusedUpFront() throws {
        let tmp = TempDir("deep")
        let store = try BlockStore.create(at: tmp.sub("store"))
        defer { store.close() }
        let deep = tmp.path + "/" + String(repeating: "d", count: 80)
        let e = #expect(throws: FurcateError.self) {
            try VMService(
                store: store,
                options: VMServiceOptions(dataDirectory: deep, mountpoint: tmp.sub("mnt"), guestDirectory: tmp.path))
        }
        #expect(e?.code == .invalidArgument && e?.message.contains("too deep") == true)
    }

    @Test func capacityDefaultsAndRefusals() {
        let gib: UInt64 = 1 << 30
        #expect(
            VMCapacity.host(accelerator: .tcg, cores: 2, memoryBytes: 24 * gib)
                == VMCapacity(vcpus: 16, memoryMiB: 36 << 10))
        #expect(VMCapacity.host(accelerator: .kvm, cores: 2, memoryBytes: 24 * gib).vcpus == 32)
        let c = VMCapacity(vcpus: 4, memoryMiB: 1024)
        let each = VMCapacity.Demand(vcpus: 1, memoryMiB: 256)
        #expect(c.refusal(inUse: .init(vcpus: 0, memoryMiB: 0), adding: each, count: 4, operation: "fork") == nil)
        let memory = c.refusal(inUse: .init(vcpus: 1, memoryMiB: 512), adding: each, count: 3, operation: "fork")
        #expect(
            memory?.contains("1280 MiB of guest memory of 1024") == true && memory?.contains("vCPUs of") == false,
            "\(memory ?? "nil")")
        let both = c.refusal(inUse: .init(vcpus: 4, memoryMiB: 1024), adding: each, operation: "resume")
        #expect(
            both?.contains("5 guest vCPUs of 4 and 1280 MiB") == true
                && both?.hasPrefix("resume would run one more VM") == true, "\(both ?? "nil")")
        #expect(
            VMCapacity.unlimited.refusal(
                inUse: .init(vcpus: 1 << 20, memoryMiB: 1 << 30), adding: each, count: 1000, operation: "fork") == nil)
    }

    @Test func transitionTableIsExplicitAndClosed() throws {
        #expect(VMState.running.canTransition(to: .suspending))
        #expect(VMState.suspended.canTransition(to: .starting))
        #expect(!VMState.stopped.canTransition(to: .running))
        #expect(!VMState.suspended.canTransition(to: .running))  // a resume goes through starting
        #expect(!VMState.lost.canTransition(to: .running))
        #expect(VMState.lost.canTransition(to: .starting))  // a cold boot from its disk
        // Every state but stopped can be stopped; nothing is reachable from nowhere.
        for s in VMState.allCases where s != .stopped { #expect(s.canTransition(to: .stopped), "\(s)") }
        for s in VMState.allCases { #expect(VMState.transitions[s] != nil, "\(s) has no row") }
        do {
            try VMState.stopped.checkTransition(to: .suspending, vm: "x", operation: "suspend")
            Issue.record("stopped -> suspending was allowed")
        } catch let e as FurcateError {
            #expect(e.code == .invalidState && e.message.contains("is stopped; cannot suspend"))
        }
    }

    @Test func idsHaveOneShape() throws {
        let id = VMID.newVM()
        #expect(id.count == 20 && id.allSatisfy { $0.isLowercase || $0.isNumber })
        try VMID.validateVM(id)
        try VMID.validateSnapshot(VMID.newSnapshot())
        for bad in ["", "../etc/passwd", String(repeating: "A", count: 20), "abc", id + "x"] {
            #expect(throws: FurcateError.self) { try VMID.validateVM(bad) }
        }
        #expect(throws: FurcateError.self) { try VMID.validateSnapshot(id) }
    }

    @Test func machineArgumentsMatchAcrossRestoresAndEscapeCommas() throws {
        var c = MachineConfig(
            memoryPath: "/m,x/files/vm.mem", kernel: "/k", initrd: "/i", rootDisk: "/d", channelSocket: "/c",
            qmpSocket: "/q",
            consoleLog: "/l")
        let boot = c.arguments(incoming: false)
        let restore = c.arguments(incoming: true)
        // The same machine either way; a boot loads the kernel and starts paused, a restore
        // (whose kernel is in RAM already) starts once loaded.
        var machine = Array(boot.dropLast())
        let k = try #require(machine.firstIndex(of: "-kernel"))
        #expect(Array(machine[k..<k + 6]) == ["-kernel", "/k", "-initrd", "/i", "-append", c.commandLine])
        machine.removeSubrange(k..<k + 6)
        #expect(Array(restore.dropLast(2)) == machine && restore.suffix(2) == ["-incoming", "defer"])
        #expect(boot.last == "-S" && !restore.contains("-S"))
        #expect(boot.contains { $0.contains("mem-path=/m,,x/files/vm.mem") })
        #expect(c.commandLine.contains("tsc_early_khz"))
        c.accelerator = .kvm
        #expect(!c.commandLine.contains("tsc_early_khz") && c.arguments(incoming: false).contains("kvm"))
        #expect(Accelerator.detect(environment: ["FURCATE_ACCEL": "tcg"]) == .tcg)
    }
}
