import Foundation

/// Parsing and printing of byte sizes as people type them: `4096`, `64K`, `64KiB`, `1M`, `16G`.
///
/// Suffixes are binary (K = 1024). Not an error: lower-case suffixes, an optional `B`/`iB`.
public enum ByteSize {
    /// Parses a size.
    /// - Throws: `FurcateError.invalidArgument` naming the text when it is not a size.
    public static func parse(_ text: String) throws -> UInt64 {
        var digits = Substring(text.trimmingCharacters(in: .whitespaces))
        var multiplier: UInt64 = 1
        let lower = digits.lowercased()
        let suffixes: [(String, UInt64)] = [
            ("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30), ("tib", 1 << 40),
            ("kb", 1 << 10), ("mb", 1 << 20), ("gb", 1 << 30), ("tb", 1 << 40),
            ("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("t", 1 << 40), ("b", 1),
        ]
        for (suffix, value) in suffixes where lower.hasSuffix(suffix) {
            digits = digits.dropLast(suffix.count)
            multiplier = value
            break
        }
        guard let n = UInt64(digits), n > 0 || multiplier == 1 else {
            throw FurcateError(.invalidArgument, "'\(text)' is not a size (examples: 4096, 64K, 1M, 16G)")
        }
        let (r, overflow) = n.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw FurcateError(.invalidArgument, "size '\(text)' is too large") }
        return r
    }

    /// A short human form: `64 KiB`, `1.5 GiB`.
    public static func format(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var v = Double(bytes)
        var i = 0
        while v >= 1024, i < units.count - 1 { v /= 1024; i += 1 }
        if i == 0 { return "\(bytes) B" }
        let rounded = (v * 10).rounded() / 10
        return rounded == rounded.rounded() ? "\(Int(rounded)) \(units[i])" : "\(rounded) \(units[i])"
    }
}
