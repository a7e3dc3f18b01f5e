// Admission: how much guest the host runs at once. A create, restore, resume or fork that
// would pass the limit is refused up front (`.overCapacity`), before anything is made, so a
// fork of 100 on a small host fails at once instead of leaving the host too slow to answer.
import Foundation
import FurcateCore
import Hypervisor

/// The guest vCPUs and guest memory a host admits at once, over every VM with a process
/// (starting, running, suspending) and every one being made. nil: no limit on that resource.
public struct VMCapacity: Sendable, Equatable {
    /// vCPUs of the VMs admitted at once.
    public var vcpus: Int?
    /// Guest RAM of the VMs admitted at once, in MiB.
    public var memoryMiB: Int?

    /// A limit of `vcpus` and `memoryMiB`; nil: none on that resource.
    public init(vcpus: Int?, memoryMiB: Int?) {
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
    }

    /// No limit on anything.
    public static let unlimited = VMCapacity(vcpus: nil, memoryMiB: nil)

    /// vCPUs per host core: 16 under KVM, where an idle vCPU costs next to nothing (OpenStack's
    /// long-standing CPU allocation ratio); 8 under TCG, where every guest's timer ticks are
    /// emulated in software: an idle guest costs ~3% of a core, and a 2-core TCG host with 60-80
    /// forks took minutes per request.
    public static func vcpusPerCore(_ accelerator: Accelerator) -> Int { accelerator == .kvm ? 16 : 8 }

    /// Guest memory as a share of host memory: 1.5 (OpenStack's RAM allocation ratio). Forks
    /// share their snapshot's pages and idle guests touch little, so some overcommit is safe;
    /// a host full of guests that each dirty all their RAM is not.
    public static let memoryRatio = 1.5

    /// The default for this host: its online cores and physical memory.
    public static func host(
        accelerator: Accelerator, cores: Int = ProcessInfo.processInfo.activeProcessorCount,
        memoryBytes: UInt64 = ProcessInfo.processInfo.physicalMemory
    ) -> VMCapacity {
        VMCapacity(
            vcpus: max(1, cores) * vcpusPerCore(accelerator),
            memoryMiB: Int(Double(memoryBytes >> 20) * memoryRatio))
    }

    /// What one VM asks of the host.
    public struct Demand: Sendable, Equatable {
        /// Virtual CPUs.
        public var vcpus: Int
        /// Guest RAM in MiB.
        public var memoryMiB: Int
        /// A demand of `vcpus` and `memoryMiB`.
        public init(vcpus: Int, memoryMiB: Int) {
            self.vcpus = vcpus
            self.memoryMiB = memoryMiB
        }
        static let zero = Demand(vcpus: 0, memoryMiB: 0)
        static func + (a: Demand, b: Demand) -> Demand {
            Demand(vcpus: a.vcpus + b.vcpus, memoryMiB: a.memoryMiB + b.memoryMiB)
        }
        static func * (a: Demand, n: Int) -> Demand { Demand(vcpus: a.vcpus * n, memoryMiB: a.memoryMiB * n) }
        static func - (a: Demand, b: Demand) -> Demand {
            Demand(vcpus: a.vcpus - b.vcpus, memoryMiB: a.memoryMiB - b.memoryMiB)
        }
    }

    /// Why `count` more VMs of `each` do not fit beside `inUse`, or nil when they do.
    public func refusal(inUse: Demand, adding each: Demand, count: Int = 1, operation: String) -> String? {
        let after = inUse + each * count
        var short: [String] = []
        if let v = vcpus, after.vcpus > v { short.append("\(after.vcpus) guest vCPUs of \(v)") }
        if let m = memoryMiB, after.memoryMiB > m { short.append("\(after.memoryMiB) MiB of guest memory of \(m)") }
        guard !short.isEmpty else { return nil }
        let what = count == 1 ? "one more VM" : "\(count) more VMs"
        return "\(operation) would run \(what) (\(each.vcpus) vCPU, \(each.memoryMiB) MiB each) beside "
            + "\(inUse.vcpus) vCPUs and \(inUse.memoryMiB) MiB in use: \(short.joined(separator: " and ")) this host admits. "
            + "Stop, suspend or delete VMs first (or raise the host's VM capacity)."
    }
}

extension VMService {
    /// vCPUs and memory of every VM with a process or being made.
    func capacityInUse() -> VMCapacity.Demand {
        var d = admitting
        for vm in vms.values where vm.state == .starting || vm.state == .running || vm.state == .suspending {
            d = d + VMCapacity.Demand(vcpus: vm.vcpus, memoryMiB: vm.memoryMiB)
        }
        return d
    }

    /// Admits `count` VMs of `each` about to be made, counted until `settle` (`reserve`), or
    /// checks that one whose state is about to count it (a resume) fits (`!reserve`).
    /// - Throws: `.overCapacity` saying what is in use, what was asked and the limit passed.
    func admit(_ each: VMCapacity.Demand, count: Int = 1, operation: String, reserve: Bool = true) throws {
        if let why = capacity.refusal(inUse: capacityInUse(), adding: each, count: count, operation: operation) {
            logger.warning("refused: host at capacity", metadata: ["operation": "\(operation)", "count": "\(count)"])
            throw FurcateError(.overCapacity, why, operation: operation)
        }
        if reserve { admitting = admitting + each * count }
    }

    /// A VM admitted by `admit` now runs (its state counts it) or was never made.
    func settle(_ each: VMCapacity.Demand, count: Int = 1) {
        admitting = admitting - each * count
    }
}
