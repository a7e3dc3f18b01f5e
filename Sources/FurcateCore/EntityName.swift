/// The rule for names accepted from outside (store files, snapshots, later VM ids): a single
/// path component, so a name can never address anything outside its namespace.
public enum EntityName {
    /// The longest accepted name, in bytes (the usual NAME_MAX).
    public static let maxLength = 255

    /// Checks `name`.
    /// - Throws: `FurcateError.invalidArgument` saying what is wrong with it.
    public static func validate(_ name: String, what: String = "name") throws {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty else { throw FurcateError(.invalidArgument, "\(what) is empty") }
        guard bytes.count <= maxLength else {
            throw FurcateError(.invalidArgument, "\(what) '\(name.prefix(40))…' is longer than \(maxLength) bytes")
        }
        guard name != "." && name != ".." else {
            throw FurcateError(.invalidArgument, "\(what) '\(name)' is not allowed")
        }
        if let bad = bytes.first(where: { $0 == UInt8(ascii: "/") || $0 == 0 || $0 < 0x20 || $0 == 0x7f }) {
            let shown = bad == UInt8(ascii: "/") ? "'/'" : "a control character"
            throw FurcateError(
                .invalidArgument, "\(what) '\(name)' contains \(shown); it must be a single path component")
        }
    }
}
