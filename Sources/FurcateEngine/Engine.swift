// FurcateEngine: the use-case layer below every API dialect. Each operation here is done whole,
// once — ownership, activity, wake-up, records and policies — so a dialect only parses a request
// and renders the answer. Neighbours: VMService, Builds, Images and Accounts below; APIServer's
// dialects and `furcate serve` above.
import Accounts
import Builds
import FurcateCore
import Images
import VMService

/// The engine's services and what it keeps about accounts: who owns what, snapshot records,
/// VM policies.
public struct Engine: Sendable {
    /// VMs, snapshots and forks.
    public let vms: VMService
    /// Images pulled into the store.
    public let images: ImageService
    /// Builds of recipes into snapshots, cached by template hash.
    public let builds: BuildService
    /// API keys per account.
    public let keys: KeyStore
    /// Who owns each VM, snapshot and build, and the snapshot records.
    public let owners: OwnerStore
    /// The default image's rootfs tarball (Debian 12 with systemd).
    public let defaultImage: String
    /// Lifetimes, idle suspension, storage quotas (`PolicyService` applies them).
    public let policies: VMPolicies
    /// A VM's idle timeout when its request names none (Freestyle's documented 300 s); 0: none.
    public var defaultIdleTimeoutSeconds = 300
    /// Where the ingress reaches VMs' exposed ports (nil: no ingress, nothing is exposed).
    public var ingress: IngressSite?

    /// An engine over these services; `quotaBytes` is each account's storage quota (nil: none).
    public init(
        vms: VMService, images: ImageService, builds: BuildService, keys: KeyStore, owners: OwnerStore,
        defaultImage: String,
        quotaBytes: UInt64? = nil
    ) {
        self.vms = vms
        self.images = images
        self.builds = builds
        self.keys = keys
        self.owners = owners
        self.defaultImage = defaultImage
        policies = VMPolicies(owners: owners, quotaBytes: quotaBytes)
    }
}

extension Engine {
    /// The account of what the CLI's local commands (`furcate run`) make.
    public static let localAccount = "local"
}

extension FurcateError.Code {
    /// A guest operation on a VM that is not running (and was not to be woken).
    public static let vmNotRunning = FurcateError.Code("vm_not_running")
    /// A guest file larger than the API hands over in one answer.
    public static let tooLarge = FurcateError.Code("too_large")
}
