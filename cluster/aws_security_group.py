"""The security group of cluster/cluster.yaml's nodes: SSH from the operator's range only, any traffic between nodes.

    python cluster/aws_security_group.py --cidr 198.51.100.7/32 [--region us-west-2] [--vpc-id vpc-...]

Prints the group's id, for ``SecurityGroupIds`` in cluster.yaml. Ray's launcher, left to make a group itself, always
adds SSH from 0.0.0.0/0 (``provider.security_group`` only adds rules to that), and it leaves a group that already has
rules alone: so the group is made here, before the first ``ray up``, and named by id (a placeholder id fails ``ray
up`` instead of opening a group). Idempotent: a second run keeps the group and removes SSH from any other range.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

SSH = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}


def ensure_security_group(ec2, name: str, cidr: str, vpc_id: str = "") -> str:
    """Create (or fix) group ``name`` in ``vpc_id`` (default: the account's default VPC); returns its id."""
    network = ipaddress.ip_network(cidr)  # raises on a typo, before anything is created
    if network.prefixlen == 0:
        raise ValueError(f"--cidr {cidr}: SSH from everywhere is what this group exists to prevent")
    if not vpc_id:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ValueError("this region has no default VPC: pass --vpc-id")
        vpc_id = vpcs[0]["VpcId"]
    found = ec2.describe_security_groups(
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "group-name", "Values": [name]}]
    )["SecurityGroups"]
    if found:
        group = found[0]
    else:
        group_id = ec2.create_security_group(GroupName=name, VpcId=vpc_id, Description="clipzss Ray cluster")["GroupId"]
        group = {"GroupId": group_id, "IpPermissions": []}
    group_id = group["GroupId"]
    key = "CidrIp" if network.version == 4 else "CidrIpv6"
    ranges = "IpRanges" if network.version == 4 else "Ipv6Ranges"
    wanted = [
        {**SSH, ranges: [{key: str(network), "Description": "operator SSH"}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id, "Description": "between cluster nodes"}]},
    ]
    stale = [
        {**SSH, "IpRanges": [r for r in rule.get("IpRanges", []) if r["CidrIp"] != str(network)],
         "Ipv6Ranges": [r for r in rule.get("Ipv6Ranges", []) if r["CidrIpv6"] != str(network)]}
        for rule in group["IpPermissions"] if rule.get("FromPort") == 22 and rule.get("IpProtocol") == "tcp"
    ]  # fmt: skip
    stale = [rule for rule in stale if rule["IpRanges"] or rule["Ipv6Ranges"]]
    if stale:
        ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=stale)
    for rule in wanted:
        try:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[rule])
        except ec2.exceptions.ClientError as e:
            if e.response["Error"]["Code"] != "InvalidPermission.Duplicate":
                raise
    return group_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster/aws_security_group.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cidr", required=True, help="the operator's range, e.g. 198.51.100.7/32 (your public IP)")
    p.add_argument("--name", default="clipzss-ray")
    p.add_argument("--region", default="us-west-2", help="cluster.yaml's provider.region")
    p.add_argument("--vpc-id", default="", help="default: the region's default VPC")
    a = p.parse_args(argv)
    import boto3

    print(ensure_security_group(boto3.client("ec2", region_name=a.region), a.name, a.cidr, a.vpc_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
