//! Why a packet left the data plane the way it did. One global per-CPU
//! counter per reason; metrics labels come from [`Reason::name`].

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident = $val:literal => $name:literal, $verdict:ident; )*) => {
        /// The reason a packet got its verdict.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $( $(#[$doc])* $variant = $val, )*
        }

        impl Reason {
            /// Every reason, in counter-index order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];
            /// Number of reasons (length of the reason counter array).
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable snake_case name, used as the metrics label.
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$variant => $name,)* }
            }

            /// The XDP verdict class this reason belongs to.
            pub const fn verdict(self) -> Verdict {
                match self { $(Reason::$variant => Verdict::$verdict,)* }
            }

            /// The reason with counter index `i`.
            pub fn from_index(i: u32) -> Option<Reason> {
                Self::ALL.get(i as usize).copied()
            }
        }
    };
}

/// What happened to the packet, as an operator reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Handed to the kernel (XDP_PASS).
    Pass,
    /// Transmitted by the data plane (XDP_TX / XDP_REDIRECT).
    Forward,
    /// Dropped (XDP_DROP).
    Drop,
}

reasons! {
    /// Destination is not a protected prefix: passed to the kernel untouched.
    PassNotProtected = 0 => "pass_not_protected", Pass;
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed untouched.
    PassNotIp = 1 => "pass_not_ip", Pass;
    /// GRE carrying ICMP for the node itself (health probes): passed still encapsulated.
    PassTunnelToNode = 2 => "pass_tunnel_to_node", Pass;
    /// Decapsulated, but the kernel has no neighbour entry yet: passed decapsulated
    /// so the kernel resolves it and forwards.
    PassDecapToKernel = 3 => "pass_decap_to_kernel", Pass;
    /// Encapsulated into a customer tunnel and transmitted.
    ForwardEncap = 4 => "forward_encap", Forward;
    /// Decapsulated from a customer tunnel and transmitted.
    ForwardDecap = 5 => "forward_decap", Forward;
    /// Frame shorter than its Ethernet / VLAN header.
    DropTruncatedEthernet = 6 => "drop_truncated_ethernet", Drop;
    /// Frame ends inside the IP header or before the IP packet's stated length.
    DropTruncatedIp = 7 => "drop_truncated_ip", Drop;
    /// IP header inconsistent (version, header length, total length, extension headers).
    DropMalformedIp = 8 => "drop_malformed_ip", Drop;
    /// Unfragmented TCP / UDP / ICMP packet ends inside its L4 header.
    DropTruncatedL4 = 9 => "drop_truncated_l4", Drop;
    /// TTL or hop limit would reach zero.
    DropTtlExpired = 10 => "drop_ttl_expired", Drop;
    /// Inner packet larger than the tunnel MTU.
    DropMtuExceeded = 11 => "drop_mtu_exceeded", Drop;
    /// Protected destination, but no customer route covers it.
    DropNoRoute = 12 => "drop_no_route", Drop;
    /// The tunnel's next hop is not resolved yet (userspace resolves it).
    DropNoNextHop = 13 => "drop_no_next_hop", Drop;
    /// Encapsulated packet larger than the next hop's link MTU.
    DropNextHopMtu = 14 => "drop_next_hop_mtu", Drop;
    /// GRE to a local endpoint that is truncated, fragmented, of another version or with routing.
    DropGreMalformed = 15 => "drop_gre_malformed", Drop;
    /// GRE to a local endpoint from an unknown remote, or with a wrong or missing key.
    DropGreUnknownTunnel = 16 => "drop_gre_unknown_tunnel", Drop;
    /// GRE payload that is neither IPv4 nor IPv6.
    DropGreUnsupportedPayload = 17 => "drop_gre_unsupported_payload", Drop;
    /// Decapsulated inner source outside the customer's prefixes and egress prefixes.
    DropSpoofedSource = 18 => "drop_spoofed_source", Drop;
    /// Decapsulated packet the kernel's routing table cannot forward.
    DropDecapUnroutable = 19 => "drop_decap_unroutable", Drop;
    /// Decapsulated packet larger than the MTU of the link the kernel routes it to.
    DropDecapMtu = 20 => "drop_decap_mtu", Drop;
    /// A helper failed (head adjustment, map inconsistency); should never count.
    DropInternal = 21 => "drop_internal", Drop;
    /// Built-in protection: TCP with an impossible flag combination (SYN+FIN,
    /// SYN+RST, no flags, or FIN+SYN+RST+PSH+ACK+URG all set).
    DropInvalidTcpFlags = 22 => "drop_invalid_tcp_flags", Drop;
    /// Built-in protection: source address equal to the destination (land).
    DropLand = 23 => "drop_land", Drop;
    /// Built-in protection: TCP or UDP with source or destination port 0.
    DropZeroPort = 24 => "drop_zero_port", Drop;
    /// Matched an operator mitigation rule whose action is drop (counted per
    /// rule as well).
    DropMitigationRule = 25 => "drop_mitigation_rule", Drop;
    /// Over the token bucket of an operator rate_limit rule (counted per rule).
    DropRateLimit = 26 => "drop_rate_limit", Drop;
    /// Blocked by a rule of the customer's firewall (counted per rule).
    DropFirewall = 27 => "drop_firewall", Drop;
    /// UDP from a reflector source port nobody allowed (built-in protection).
    DropReflection = 28 => "drop_reflection", Drop;
}
