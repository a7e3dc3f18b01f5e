import Foundation

/// A JSON integer from `JSONSerialization`: not a boolean (Foundation answers `true as? Int`
/// with 1) and not a fraction.
func jsonInteger(_ v: Any?) -> Int? {
    guard let n = v as? NSNumber else { return nil }
    switch String(cString: n.objCType) {
    case "c", "d", "f": return nil
    default: return n.intValue
    }
}

/// A JSON boolean from `JSONSerialization` (not the numbers 0 and 1).
func jsonBool(_ v: Any?) -> Bool? {
    guard let n = v as? NSNumber, String(cString: n.objCType) == "c" else { return nil }
    return n.boolValue
}
